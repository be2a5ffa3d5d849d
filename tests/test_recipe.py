"""Recipe validation: errors are one line naming the key; overrides reach the right key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlrl.errors import RecipeError
from vlrl.recipe import apply_overrides, load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def _raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_tiny_recipe_validates():
    r = load_recipe(TINY)
    assert list(r.stages) == ["data", "reading", "rl_prompts", "arithmetic", "model", "pretrain", "sft", "sft_shuffled", "sft_lowres", "merge", "rl"]
    # RL draws fresh prompts (none in the held-out split's data stage), holds perception with the anchor
    # and scores every task by the eval's verdict
    rl = r.stages["rl"]
    assert rl.data == "rl_prompts" and r.stages["rl_prompts"].exclude == ["data"]
    assert rl.algo.perception_anchor.kl_coef > 0 and rl.curriculum.perception_share > 0
    assert rl.rewards["routing"] == {} and rl.rewards["default_route"][0] == "answer_match"
    # SFT's reading phase draws from its own corpus, which excludes the data stage's records
    assert r.stages["sft"].phases[0].data == "reading" and r.stages["reading"].exclude == ["data"]
    # pretraining's arithmetic phase reads its own text corpus, which excludes the data stage's records
    arith = next(ph for ph in r.stages["pretrain"].phases if ph.name == "arithmetic")
    assert arith.data == "arithmetic" and arith.select.tasks == ["text_arith"] and r.stages["arithmetic"].exclude == ["data"]
    # MindVL's merge: the same SFT at two resolutions
    assert r.stages["merge"].parts == ["sft", "sft_lowres"]
    assert r.stages["sft_lowres"].max_pixels == 9 * 28 * 28 and r.stages["sft"].max_pixels is None
    assert r.stages["sft_lowres"].phases == r.stages["sft"].phases
    assert r.stages["pretrain"].from_ == "model"
    assert [p.trainable for p in r.stages["pretrain"].phases] == ["language"] * 4  # tower frozen
    assert r.stages["model"].vision_pretrain is not None and r.stages["model"].vision_pretrain.steps > 0


def test_unknown_key_names_the_path():
    raw = _raw()
    raw["stages"]["pretrain"]["phases"][1]["stepz"] = 3
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw, "r.yaml")
    msg = str(e.value)
    assert "stages.pretrain.phases.1.stepz" in msg and "unknown key" in msg
    assert "\n" not in msg


def test_wrong_type_names_path_and_value():
    raw = _raw()
    raw["stages"]["pretrain"]["optim"]["lr"] = "fast"
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw, "r.yaml")
    assert "stages.pretrain.optim.lr" in str(e.value) and "'fast'" in str(e.value)


def test_missing_stage_input_is_reported():
    raw = _raw()
    raw["stages"]["pretrain"]["from"] = "sft"
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw, "r.yaml")
    assert "stages.pretrain.from" in str(e.value) and "'sft'" in str(e.value)


def test_later_stage_reference_is_refused():
    raw = _raw()
    raw["stages"]["pretrain"]["data"] = "later"
    raw["stages"]["later"] = {"kind": "data"}
    with pytest.raises(RecipeError, match="comes after"):
        validate_recipe(raw, "r.yaml")


def test_from_must_name_a_model_stage():
    raw = _raw()
    raw["stages"]["pretrain"]["from"] = "data"
    with pytest.raises(RecipeError, match="data stage"):
        validate_recipe(raw, "r.yaml")


def test_unknown_stage_kind():
    raw = _raw()
    raw["stages"]["x"] = {"kind": "distill", "from": "pretrain"}
    with pytest.raises(RecipeError, match="stages.x.kind.*unknown stage kind"):
        validate_recipe(raw, "r.yaml")


def test_overrides_by_stage_name_and_list_index():
    r = load_recipe(TINY, ["pretrain.optim.lr=3e-4", "pretrain.phases.2.steps=7", "device=cpu", "data.n=50"])
    assert r.stages["pretrain"].optim.lr == pytest.approx(3e-4)
    assert r.stages["pretrain"].phases[2].steps == 7
    assert r.device == "cpu" and r.stages["data"].n == 50


def test_override_does_not_mutate_input():
    raw = _raw()
    apply_overrides(raw, ["pretrain.batch_size=3"])
    assert raw["stages"]["pretrain"]["batch_size"] == 32


@pytest.mark.parametrize(
    "item,match",
    [("nokey", "key.path=value"), ("pretrain.phases.9.steps=1", "list index below 4"), ("seed.x=1", "is a value")],
)
def test_bad_overrides(item, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(TINY, [item])


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nstages:\n  data: {n: [1,\n")
    with pytest.raises(RecipeError, match="bad.yaml: line"):
        load_recipe(p)


def test_a_key_given_twice_is_refused_not_dropped(tmp_path):
    """YAML keeps the last of two equal keys: the first reward component would vanish."""
    p = tmp_path / "dup.yaml"
    text = TINY.read_text().replace("      default_route: [answer_match, format]\n", "      default_route: [answer_match, format]\n      routing: {arith: [format]}\n")
    p.write_text(text)
    line = text.splitlines().index("      routing: {arith: [format]}") + 1
    with pytest.raises(RecipeError, match=rf"dup.yaml: line {line}: not valid YAML \(key 'routing' given twice in one mapping\)"):
        load_recipe(p)
    from vlrl.recipe import UniqueKeyLoader

    merged = yaml.load("base: &b {x: 1, y: 1}\nover: {<<: *b, x: 2}\n", Loader=UniqueKeyLoader)
    assert merged["over"] == {"x": 2, "y": 1}  # a key brought in by a merge (<<: *sft) may be overridden


def test_rl_stage_is_strict(tmp_path):
    raw = _raw()
    raw["stages"]["rl"] = {"from": "pretrain", "data": "data", "steps": 2, "lr": 1e-6}
    with pytest.raises(RecipeError, match=r"stages\.rl\.lr: unknown key"):
        validate_recipe(raw, "r.yaml")


def test_merge_parts_are_checked_at_validate():
    raw = _raw()
    raw["stages"]["merge"] = {"from": ["pretrain", "later"]}
    raw["stages"]["later"] = {"kind": "eval", "from": "pretrain"}
    with pytest.raises(RecipeError, match=r"stages\.merge\.from\.1: stage 'later' comes after 'merge'"):
        validate_recipe(raw, "r.yaml")
    raw["stages"]["merge"] = {"from": ["pretrain", "data"]}
    with pytest.raises(RecipeError, match=r"stages\.merge\.from\.1: stage 'data' is a data stage"):
        validate_recipe(raw, "r.yaml")


def test_fingerprint_changes_with_config():
    a = load_recipe(TINY)
    b = load_recipe(TINY, ["pretrain.phases.0.steps=1"])
    assert a.stage_fingerprint("data") == b.stage_fingerprint("data")
    assert a.stage_fingerprint("pretrain") != b.stage_fingerprint("pretrain")
    # a key written out at its default hashes as if absent (a later vlrl's new optional key)
    c = load_recipe(TINY, ["data.exclude=[]", "pretrain.phases.0.data=null"])
    assert (c.stage_fingerprint("data"), c.stage_fingerprint("pretrain")) == (a.stage_fingerprint("data"), a.stage_fingerprint("pretrain"))


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlrl.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_validate_ok_and_errors_in_one_line(tmp_path):
    ok = _cli("validate", str(TINY))
    assert ok.returncode == 0, ok.stderr
    assert "11 stage(s)" in ok.stdout
    raw = _raw()
    raw["stages"]["pretrain"]["optim"]["bogus"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = _cli("validate", str(bad))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "stages.pretrain.optim.bogus" in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_run_missing_input_is_one_line(tmp_path):
    raw = _raw()
    raw["stages"] = {"rl": {"from": str(tmp_path / "nope"), "data": str(tmp_path), "steps": 1}}
    raw["eval"] = {"data": str(tmp_path)}
    raw["run_dir"] = str(tmp_path / "run")
    p = tmp_path / "rl.yaml"
    p.write_text(yaml.safe_dump(raw))
    res = _cli("run", str(p))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "stages.rl.from" in lines[0] and "does not exist" in lines[0], res.stderr


PLUGIN = "from rewards import reward\n\n\n@reward('has_unit')\ndef has_unit(sample, *, unit: str = 'cm') -> float:\n    return float(unit in sample.response)\n"


def test_cli_validate_imports_and_checks_reward_plugins(tmp_path):
    """A plugin's name, file and options are checked by validate, not when RL starts hours later."""
    (tmp_path / "mine.py").write_text(PLUGIN)

    def validate(component: dict, **rl) -> subprocess.CompletedProcess:
        raw = _raw()
        raw["stages"]["rl"]["rewards"] = {"components": {"acc": {"fn": "answer_match"}, "units": component}}
        raw["stages"]["rl"].update(rl)
        p = tmp_path / "r.yaml"
        p.write_text(yaml.safe_dump(raw, sort_keys=False))
        return _cli("validate", str(p), cwd=tmp_path)  # relative plugin files: from the directory run in

    ok = validate({"fn": "mine.py:has_unit", "args": {"unit": "mm"}})
    assert ok.returncode == 0, ok.stderr
    assert "stages.rl rewards: acc (answer_match), units (mine.py:has_unit)" in " ".join(ok.stdout.split())
    for component, message in [
        ({"fn": "mine.py:has_unitz"}, "'mine.py' has no attribute 'has_unitz'"),
        ({"fn": "nope.py:has_unit"}, "reward plugin file 'nope.py' does not exist"),
        ({"fn": "has_units"}, "unknown reward plugin 'has_units'"),
        ({"fn": "mine.py:has_unit", "args": {"units": "mm"}}, "unknown option(s) ['units']; it accepts ['unit']"),
        ({"fn": "mine.py:has_unit", "wieght": 2}, "stages.rl.rewards.components.units.wieght: extra inputs are not permitted"),
        ({"fn": "overlong", "args": {"max_length": 4, "cache": 8}}, "need 0 < cache <= max_length"),
    ]:
        res = validate(component)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "r.yaml: stages.rl.rewards." in lines[0] and message in lines[0], lines[0]
    res = validate({"fn": "mine.py:has_unit"}, reward_terms={"overlong": {"weight": 1.0, "args": {"max_length": 4, "cache": 8}}})
    assert res.returncode == 2 and "r.yaml: stages.rl.reward_terms.overlong: " in res.stderr and "cache <= max_length" in res.stderr, res.stderr


def test_run_checks_reward_plugins_before_any_stage(tmp_path):
    from vlrl.runner import run_recipe

    run_dir = tmp_path / "run"
    (run_dir / "rl").mkdir(parents=True)  # an earlier rl output, which --force would move aside
    raw = {
        "name": "t",
        "run_dir": str(run_dir),
        "stages": {
            "data": {"n": 20, "n_eval": 5},
            "rl": {"from": str(tmp_path), "data": "data", "steps": 1, "rewards": {"components": {"x": {"fn": "no_such_plugin"}}}},
        },
    }
    with pytest.raises(RecipeError, match=r"^stages\.rl\.rewards\.components\.x: unknown reward plugin 'no_such_plugin'"):
        run_recipe(validate_recipe(raw), force=["rl"])
    assert not (run_dir / "data").exists() and (run_dir / "rl").is_dir()

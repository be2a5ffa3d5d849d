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
    with pytest.raises(RecipeError, match=rf"dup.yaml: line {line}: not valid YAML \(duplicate key 'routing', first at line {line - 2}\)"):
        load_recipe(p)
    from vlrl.recipe import UniqueKeyLoader

    merged = yaml.load("base: &b {x: 1, y: 1}\nover: {<<: *b, x: 2}\n", Loader=UniqueKeyLoader)
    assert merged["over"] == {"x": 2, "y": 1}  # a key brought in by a merge (<<: *sft) may be overridden


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    """PyYAML would keep the second `data:` and silently drop the first stage."""
    p = tmp_path / "dup.yaml"
    p.write_text("name: x\nstages:\n  data: {n: 5}\n  model: {preset: micro}\n  data: {n: 6}\n")
    with pytest.raises(RecipeError, match=r"dup\.yaml: line 5: not valid YAML \(duplicate key 'data', first at line 3\)"):
        load_recipe(p)


def test_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("name: x\nstages:\n  data: &d {n: 5, seed: 1}\n  more:\n    <<: *d\n    kind: data\n    seed: 2\n")
    assert load_recipe(p).stages["more"].seed == 2


@pytest.mark.parametrize("item,match", [
    ("pretrain.optim=[1", r"override 'pretrain.optim=\[1': the value is not valid YAML"),
    ("pretrian.optim.lr=1", r"override 'pretrian.optim.lr=1': 'pretrian' is neither a stage \(data, reading, .*\) nor a top-level key \(name, "),
])
def test_override_errors_name_the_override(item, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(TINY, [item])


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


def _paths_recipe(tmp_path, stages: dict) -> dict:
    ckpt, only_train = tmp_path / "ckpt", tmp_path / "only_train"
    for d in (ckpt, only_train, tmp_path / "empty"):
        d.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text("{}")
    (only_train / "train.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("")
    return {"name": "p", "stages": stages}


@pytest.mark.parametrize("stages,match", [
    ({"sft": {"from": "{t}/empty", "data": "{t}/only_train", "phases": [{"name": "a", "steps": 1}]}},
     r"stages\.sft\.from: path '.*/empty' is not a checkpoint folder \(no config\.json in it\)"),
    ({"sft": {"from": "{t}/notes.txt", "data": "{t}/only_train", "phases": [{"name": "a", "steps": 1}]}},
     r"stages\.sft\.from: path '.*/notes\.txt' is a file: expected a checkpoint folder"),
    ({"sft": {"from": "{t}/ckpt", "data": "{t}/empty", "phases": [{"name": "a", "steps": 1}]}},
     r"stages\.sft\.data: path '.*/empty' holds no train\.jsonl or train\.parquet"),
    ({"sft": {"from": "{t}/ckpt", "data": "{t}/notes.txt", "phases": [{"name": "a", "steps": 1}]}},
     r"stages\.sft\.data: path '.*/notes\.txt' is not a record file: expected \.jsonl or \.parquet"),
    ({"ev": {"kind": "eval", "from": "{t}/ckpt", "data": "{t}/only_train"}},
     r"stages\.ev\.data: path '.*/only_train' holds no eval\.jsonl or eval\.parquet"),
    ({"merge": {"from": ["{t}/ckpt", "{t}/empty"]}}, r"stages\.merge\.from\.1: path '.*/empty' is not a checkpoint folder"),
    ({"data": {"path": "{t}/nope"}}, r"stages\.data\.path: '.*/nope' does not exist"),
    ({"data": {"path": "{t}/only_train"}}, r"stages\.data\.path: '.*/only_train' holds no eval\.jsonl or eval\.parquet"),
    ({"model": {"path": "{t}/empty"}}, r"stages\.model\.path: '.*/empty' is not a checkpoint folder"),
    ({"sft": {"from": "sft", "data": "{t}/only_train", "phases": [{"name": "a", "steps": 1}]}},
     r"stages\.sft\.from: a stage cannot read its own output"),
])
def test_paths_are_checked_for_what_the_stage_reads(tmp_path, stages, match):
    """A folder that exists but holds no checkpoint (or no split the stage reads) fails at
    validate, as a missing one does, not when its stage starts hours into a run."""
    raw = _paths_recipe(tmp_path, yaml.safe_load(yaml.safe_dump(stages).replace("{t}", str(tmp_path))))
    with pytest.raises(RecipeError, match=match):
        validate_recipe(raw, "r.yaml")


def test_paths_that_hold_what_the_stage_reads_validate(tmp_path):
    stages = {"data": {"path": str(tmp_path / "both")}, "sft": {"from": str(tmp_path / "ckpt"), "data": str(tmp_path / "only_train"),
              "phases": [{"name": "a", "steps": 1}]}, "ev": {"kind": "eval", "from": "sft", "data": str(tmp_path / "both" / "eval.jsonl")}}
    raw = _paths_recipe(tmp_path, stages)
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "train.parquet").write_bytes(b"")
    (tmp_path / "both" / "eval.jsonl").write_text("")
    assert list(validate_recipe(raw, "r.yaml").stages) == ["data", "sft", "ev"]


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
        ({"fn": "mine.py:has_unit", "wieght": 2}, "stages.rl.rewards.components.units.wieght: unknown key (got 2)"),
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
    (tmp_path / "config.json").write_text("{}")  # `from:` is checked to be a checkpoint folder
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


@pytest.mark.parametrize("override,expected", [
    ("rl.rewards.bogus=1", "stages.rl.rewards.bogus: unknown key (got 1)"),
    ("rl.rewards.default_route=[answer_mtch]", "stages.rl.rewards: default_route: unknown component(s) ['answer_mtch']"),
])
def test_cli_checks_the_rl_rewards_section_before_anything_runs(tmp_path, override, expected):
    """The kernel passes `rewards` through as a mapping; the CLI checks it with the rewards
    schema at validate and run, where a typo used to wait for the RL stage to start."""
    res = _cli("validate", str(TINY), override)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and f"tiny.yaml: {expected}" in lines[0], res.stderr
    res = _cli("run", str(TINY), override, f"run_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and expected in res.stderr and not (tmp_path / "run").exists()


def test_an_unknown_model_preset_fails_at_validate():
    with pytest.raises(RecipeError, match=r"stages\.model\.preset: input should be 'tiny' or 'micro' \(got 'tny'\)"):
        load_recipe(TINY, ["model.preset=tny"])


def test_cli_errors_keep_brackets_in_paths(tmp_path):
    """rich read `[v2]` in a path as a markup tag and dropped it from the message."""
    missing = tmp_path / "set[v2]" / "nope"
    res = _cli("validate", str(TINY), f"data.path={missing}")
    assert res.returncode == 2 and f"'{missing}' does not exist" in " ".join(res.stderr.split()), res.stderr


@pytest.mark.parametrize("override,expected", [
    ("data.mix={reasonin: 1.0}", "stages.data.mix.reasonin: input should be 'perception', 'reasoning' or 'text' (got 'reasonin')"),
    ("pretrain.phases.3.select.weights={percepton: 0.6}", "stages.pretrain.phases.3.select.weights.percepton: input should be 'perception'"),
    ("data.mix={text: -1}", "stages.data.mix.text: input should be greater than or equal to 0 (got -1)"),
])
def test_family_shares_are_keyed_by_family(override, expected):
    """A misspelt family in a share passed validate and weighed nothing (or failed in the stage)."""
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, [override])
    assert expected in str(e.value)


def test_hybrid_recipe_reuses_the_tiny_runs_stages():
    """tiny-hybrid.yaml says pointing it at a tiny run reuses that run's SFT checkpoint:
    that holds only while every stage before its RL stage is tiny.yaml's, byte for byte
    of config, and its RL stage is tiny's with the hybrid terms added (the ablation's
    `anchor` variant is then the tiny recipe's RL)."""
    from rlhf.ablation import strip_term, terms_on

    tiny, hybrid = load_recipe(TINY), load_recipe(ROOT / "recipes" / "tiny-hybrid.yaml")
    before = [n for n in hybrid.stages if n != "rl_hybrid"]
    assert before and all(n in tiny.stages for n in before)
    assert {n: hybrid.stage_fingerprint(n) for n in before} == {n: tiny.stage_fingerprint(n) for n in before}
    raw_h = yaml.safe_load((ROOT / "recipes" / "tiny-hybrid.yaml").read_text())["stages"]["rl_hybrid"]
    assert terms_on(raw_h) == ["anchor", "visual", "diversity", "concise"]
    for term in ("visual", "diversity", "concise"):
        raw_h = strip_term(raw_h, term)
    assert raw_h["algo"].pop("visual") == {"coef": 0.0, "cap": 0.5, "per": "token", "correct_only": True, "metric": True}
    raw_h.pop("kind")
    raw = _raw()
    as_tiny = validate_recipe({**raw, "stages": {**raw["stages"], "rl": raw_h}})
    assert as_tiny.stage_fingerprint("rl") == tiny.stage_fingerprint("rl")


def test_guided_recipe_is_the_tiny_runs_stages_and_its_rl_with_named_changes():
    """tiny-guided.yaml reuses a tiny run's SFT checkpoint, so every stage before its RL
    stage must be tiny.yaml's; its RL stage is tiny's with exactly the changes its header
    names (guidance in every group, the tower trained at 3x, the steps and their schedule,
    perception at 15% of the prompts, 2 samples for each of 72 prompts in one generation
    round, a held-out point every 100 steps)."""
    tiny = load_recipe(TINY)
    guided = load_recipe(ROOT / "recipes" / "tiny-guided.yaml")
    before = [n for n in guided.stages if n != "rl_guided"]
    assert before and all(n in tiny.stages for n in before)
    assert {n: guided.stage_fingerprint(n) for n in before} == {n: tiny.stage_fingerprint(n) for n in before}
    raw_g = yaml.safe_load((ROOT / "recipes" / "tiny-guided.yaml").read_text())["stages"]["rl_guided"]
    assert raw_g["algo"].pop("guidance") == {"enabled": True, "when": "always"}
    assert raw_g["optim"].pop("lr_mult") == {"vision": 3.0, "projector": 3.0}
    assert (raw_g["trainable"], raw_g["steps"]) == ("all", 450)
    raw_g.update(trainable="language", steps=150)
    assert raw_g["curriculum"]["schedule"][1] == {"from_step": 225, "difficulty": [1, 3]}
    raw_g["curriculum"]["schedule"][1]["from_step"] = 75
    assert raw_g["curriculum"]["perception_share"] == 0.15
    raw_g["curriculum"]["perception_share"] = 0.3
    assert (raw_g["rollout"]["n"], raw_g["rollout"]["prompts_per_step"]) == (2, 72)
    raw_g["rollout"].update(n=8, prompts_per_step=16)
    assert raw_g["algo"]["dynamic_sampling"]["max_rounds"] == 1
    raw_g["algo"]["dynamic_sampling"]["max_rounds"] = 2
    assert raw_g["eval_every"] == 100
    raw_g["eval_every"] = 50
    raw_g.pop("kind")
    raw = _raw()
    as_tiny = validate_recipe({**raw, "stages": {**raw["stages"], "rl": raw_g}})
    assert as_tiny.stage_fingerprint("rl") == tiny.stage_fingerprint("rl")

"""`vlrl ablate`: variants from a hybrid rl stage, the outputs' form, and a micro run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.ablation import COLUMNS, paired_cells, strip_term, terms_on, variants, write_outputs
from vlrl.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]

HYBRID = {
    "from": "x", "data": "d", "steps": 2,
    "rollout": {"n": 2, "modes": [{"name": "short", "suffix": "Answer briefly.", "max_tokens": 4}]},
    "algo": {"perception_anchor": {"kl_coef": 0.1}, "visual": {"coef": 0.2, "cap": 0.5}},
    "reward_terms": {"diversity": {"weight": 0.1}, "conciseness": {"weight": 0.1}},
}


def test_variants_strip_every_other_term():
    from vlrl.recipe_rl import RlStage

    assert terms_on(HYBRID) == ["anchor", "visual", "diversity", "concise"]
    vs = variants(HYBRID)
    assert list(vs) == ["plain", "anchor", "visual", "diversity", "concise", "all"]
    assert terms_on(vs["plain"]) == [] and terms_on(vs["all"]) == terms_on(HYBRID)
    for t in ("anchor", "visual", "diversity", "concise"):
        assert terms_on(vs[t]) == [t]
    for v in vs.values():
        st = RlStage.model_validate(v)
        assert st.algo.visual.metric  # every variant measures the visual dependency
    assert HYBRID["algo"]["perception_anchor"]["kl_coef"] == 0.1  # the input is not modified
    assert "modes" not in strip_term(HYBRID, "concise")["rollout"]
    assert list(variants(HYBRID, ["plain", "all"])) == ["plain", "all"]
    with pytest.raises(RecipeError, match="not a variant"):
        variants(HYBRID, ["nope"])
    with pytest.raises(RecipeError, match="no hybrid term"):
        variants({"from": "x", "data": "d", "steps": 1})


def test_outputs_have_the_report_form(tmp_path):
    from rollout.server.rundir import ablation_table

    rows = [{"variant": "plain", "reasoning_acc": 0.5, "visual_dependency": 0.123456}, {"variant": "all", "reasoning_acc": 0.6}]
    series = {"plain": {"visual/dependency": [(1, 0.1), (2, 0.2)]}, "all": {"visual/dependency": [(1, 0.3), (2, None)]}}
    path = write_outputs(tmp_path, "t", rows, series)
    data = json.loads(path.read_text())
    assert ablation_table(data) == {"title": "t", "columns": COLUMNS, "rows": data["rows"]}
    assert data["rows"][0]["visual_dependency"] == 0.1235
    svg = (tmp_path / "ablation-visual_dependency.svg").read_text()
    assert svg.startswith("<svg") and "plain" in svg and "all" in svg
    md = (tmp_path / "ablation.md").read_text()
    assert "| plain | 0.500 |" in md and "ablation-visual_dependency.svg" in md


def _eval(folder: Path, correct: dict[str, list[bool]]) -> Path:
    preds = [{"id": f"{fam}{i}", "family": fam, "task": fam, "answer": str(i), "correct": c}
             for fam, cs in correct.items() for i, c in enumerate(cs)]
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({"predictions": preds}))
    return folder


def test_paired_cells_are_the_paired_change_with_its_interval(tmp_path):
    """20 reasoning records: the new eval gains 6 and loses 1 (+25 points; McNemar-style
    interval from the discordant pairs, vlrl/eval_diff.py); perception is unchanged."""
    from vlrl.eval_diff import paired_delta_ci

    base = _eval(tmp_path / "base", {"reasoning": [True] * 4 + [False] * 16, "perception": [True, False] * 5, "text": [True]})
    new = _eval(tmp_path / "new", {"reasoning": [False] + [True] * 3 + [True] * 6 + [False] * 10, "perception": [True, False] * 5, "text": [False]})
    d, lo, hi = paired_delta_ci(20, 6, 1)
    assert d == pytest.approx(0.25)
    assert paired_cells(base, new, "start") == {
        "reasoning_vs_start": f"+25.0 [{100 * lo:+.1f}, {100 * hi:+.1f}]",
        "perception_vs_start": f"+0.0 [{100 * paired_delta_ci(10, 0, 0)[1]:+.1f}, {100 * paired_delta_ci(10, 0, 0)[2]:+.1f}]",
    }  # text is not an ablation column
    assert paired_cells(base, tmp_path / "missing", "plain") == {}  # no eval: empty cells, not an error
    other = _eval(tmp_path / "other", {"reasoning": [True]})
    assert paired_cells(base, other, "plain") == {}  # other records: nothing to pair


def test_cli_error_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "n", "run_dir": str(tmp_path / "run"), "stages": {"data": {"n": 10, "n_eval": 2}, "model": {"preset": "micro"}, "rl": {"from": "model", "data": "data", "steps": 1}}}))
    p = subprocess.run([sys.executable, "-m", "vlrl.cli", "ablate", str(recipe)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "no hybrid term" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()  # nothing ran before the error


def test_micro_ablation_runs_every_variant(tmp_path):
    from rollout.server.rundir import RunDir
    from rlhf.ablation import run_ablation

    raw = {
        "name": "abl", "run_dir": str(tmp_path / "run"), "device": "cpu", "threads": 1, "tracking": {"tensorboard": False},
        "eval": {"data": "data", "limit": 6, "batch_size": 6, "max_new_tokens": 6},
        "stages": {
            "data": {"n": 60, "n_eval": 6, "seed": 1},
            "model": {"preset": "micro", "corpus_size": 200},  # evaluated: the variants pair against it
            "rl": {**HYBRID, "from": "model", "data": "data", "placement": "inline", "rewards": {"workers": 0},
                   "rollout": {**HYBRID["rollout"], "prompts_per_step": 2, "max_tokens": 6}, "curriculum": {"perception_share": 0.5}},
        },
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = run_ablation(recipe, steps=2, only=["plain", "anchor", "all"])
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["plain", "anchor", "all"]
    for r in data["rows"]:
        assert r["train_seconds"] > 0 and r["visual_dependency"] is not None and 0 <= r["distinct_2"] <= 1
        assert r["eval_acc"] is not None and r["response_length"] > 0
        paired = {k for k in r if "_vs_" in k}
        want = {f"{fam}_vs_{b}" for b in ("start", *(["plain"] if r["variant"] != "plain" else [])) for fam in ("reasoning", "perception")}
        assert paired and paired <= want and {k.split("_vs_")[1] for k in paired} == {k.split("_vs_")[1] for k in want}
        assert all(re.fullmatch(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", r[k]) for k in paired)
    assert (tmp_path / "run" / "ablation" / "all" / "rl" / "DONE.json").is_file()
    assert not (tmp_path / "run" / "rl").exists()  # the rl stage itself is not run, only its variants
    assert RunDir(tmp_path / "run").ablations()[0][1]["rows"] == data["rows"]
    again = run_ablation(recipe, steps=2, only=["plain"])  # finished variants are skipped, not rerun
    assert json.loads(again.read_text())["rows"][0] == data["rows"][0]

"""The RL stage's held-out curve (rlhf/heldout.py) on the micro model: points at step 0,
every `eval_every` steps and the last; the last equals the closing eval; the first equals
an eval of the starting checkpoint; a crash keeps the points up to its checkpoint and the
resumed run ends with the curve of an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.heldout import CURVE_FILE, CurvePoint, due_steps, read_curve
from test_rl_stage import _run, build_micro_start, rl_recipe, run_until_crash, undocumented
from vlrl.data.io import split_path
from vlrl.errors import RecipeError
from vlrl.eval import evaluate
from vlrl.tracking import read_metrics

torch.set_num_threads(1)

EVAL = {"limit": 12, "batch_size": 12, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return build_micro_start(tmp_path_factory.mktemp("rlstart"))


def _with_curve(run_dir: Path, data: Path, ckpt: Path, **rl) -> dict:
    raw = rl_recipe(run_dir, data, ckpt, **rl)
    raw["stages"]["rl"]["eval"] = {"data": str(data), **EVAL}
    return raw


def _curve(out: Path) -> list[tuple[int, float, dict]]:
    return [(p.step, p.accuracy, p.families) for p in read_curve(out)]


def test_due_steps():
    assert due_steps(None, 10) == []
    assert due_steps(4, 10) == [0, 4, 8, 10]
    assert due_steps(5, 10) == [0, 5, 10]
    assert due_steps(20, 10) == [0, 10]


def test_a_torn_last_line_is_dropped(tmp_path):
    p = CurvePoint(step=0, n=3, accuracy=1 / 3, by_family={"reasoning": 1 / 3}, families={"reasoning": {"1": 1 / 3, "all": 1 / 3}}, seconds=0.1)
    (tmp_path / CURVE_FILE).write_text(p.to_json() + "\n" + p.to_json()[:20])
    assert read_curve(tmp_path) == [p]


def test_curve_points_match_the_evals_of_their_checkpoints(start, tmp_path):
    data, ckpt = start
    out = _run(_with_curve(tmp_path / "run", data, ckpt, eval_every=2))  # 3 steps: points 0, 2, 3
    points = read_curve(out)
    assert [p.step for p in points] == [0, 2, 3] and all(p.n == EVAL["limit"] for p in points)
    # step 0 is the starting checkpoint; step 3, the last, the checkpoint the closing eval read
    first = evaluate(ckpt, split_path(data, "eval"), limit=EVAL["limit"], batch_size=EVAL["batch_size"], max_new_tokens=EVAL["max_new_tokens"])
    closing = json.loads((out / "eval.json").read_text())
    assert points[0].accuracy == first.accuracy and points[0].by_family == first.by_family
    assert points[-1].accuracy == closing["accuracy"] and points[-1].by_family == closing["by_family"]
    assert points[-1].families == {f: {d: s["accuracy"] for d, s in cells.items()} for f, cells in closing["families"].items()}
    # the points are in the metrics (at their steps) and in DONE.json
    logged = {m["step"]: m["heldout/accuracy"] for m in read_metrics(out / "metrics.jsonl") if "heldout/accuracy" in m}
    assert logged == {p.step: p.accuracy for p in points}
    rows = read_metrics(out / "metrics.jsonl")  # less the closing eval's eval/* keys (docs/metrics.md)
    assert undocumented([{k: v for k, v in m.items() if not k.startswith("eval/")} for m in rows]) == []
    done = json.loads((out / "DONE.json").read_text())["summary"]["heldout_curve"]
    assert [(d["step"], d["accuracy"]) for d in done] == [(p.step, p.accuracy) for p in points]
    assert not (out / "heldout_policy").exists()


def test_eval_limit_takes_the_first_records(start, tmp_path):
    data, ckpt = start
    out = _run(_with_curve(tmp_path / "run", data, ckpt, eval_every=5, eval_limit=5, steps=1))
    assert [(p.step, p.n) for p in read_curve(out)] == [(0, 5), (1, 5)]


def test_resume_keeps_the_points_up_to_its_checkpoint(start, tmp_path, monkeypatch):
    from rlhf import stage as stage_mod

    data, ckpt = start
    ref = _run(_with_curve(tmp_path / "ref", data, ckpt, steps=4, eval_every=1))
    raw = _with_curve(tmp_path / "killed", data, ckpt, steps=4, eval_every=1)
    killed = run_until_crash(monkeypatch, raw)
    assert [p.step for p in read_curve(killed)] == [0, 1, 2, 3]  # the checkpoint is at step 2

    taken = []
    real_take = stage_mod.HeldoutCurve.take
    monkeypatch.setattr(stage_mod.HeldoutCurve, "take", lambda self, step, *a: taken.append(step) or real_take(self, step, *a))
    _run(raw)
    assert taken == [3, 4]  # 0-2 kept, 3 replayed with its step
    assert _curve(killed) == _curve(ref)


def test_a_curve_without_eval_data_is_a_recipe_error_before_any_step(start, tmp_path):
    data, ckpt = start
    raw = rl_recipe(tmp_path / "run", data, ckpt, eval_every=1)  # the micro recipe has eval: false
    with pytest.raises(RecipeError, match=r"stages\.rl\.eval_every.*no eval"):
        _run(raw)
    assert not (tmp_path / "run" / "rl" / "rollouts.sqlite").exists()

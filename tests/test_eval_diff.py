"""Paired eval comparison: the statistics against their formulas, and refusal of
reports that were not scored on the same records."""

import json
import math
import random

import pytest
from typer.testing import CliRunner

from vlrl.cli import app
from vlrl.errors import VlrlError
from vlrl.eval_diff import Z95, compare_with_start, diff_reports, load_report, mcnemar_exact_p, paired_delta_ci, steps_markdown


def test_mcnemar_exact_against_the_binomial_tail():
    assert mcnemar_exact_p(0, 0) == 1.0
    # 1 vs 9 discordant: P(X <= 1) for Binomial(10, 1/2) is 11/1024, doubled
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)
    assert mcnemar_exact_p(5, 5) == 1.0  # the doubled tail is capped at 1
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    # a large balanced split is not significant, a lopsided one is
    assert mcnemar_exact_p(48, 52) > 0.5 and mcnemar_exact_p(30, 70) < 1e-4


def test_paired_interval_against_the_formula():
    d, lo, hi = paired_delta_ci(100, 10, 4)
    se = math.sqrt((14 - 36 / 100) / 100**2)
    assert d == pytest.approx(0.06)
    assert (lo, hi) == (pytest.approx(0.06 - Z95 * se), pytest.approx(0.06 + Z95 * se))
    assert paired_delta_ci(50, 0, 0) == (0.0, 0.0, 0.0)  # identical predictions: no spread
    with pytest.raises(ValueError):
        paired_delta_ci(0, 0, 0)


def test_paired_interval_covers_the_true_difference():
    """The interval's 95% is what it claims: simulate two checkpoints whose per-record
    correctness is correlated, with a known accuracy difference of 5 points."""
    rng = random.Random(0)
    n, hits, trials = 400, 0, 400
    for _ in range(trials):
        b = c = 0
        for _ in range(n):
            u = rng.random()  # P(new only) = 0.10, P(base only) = 0.05
            b += u < 0.10
            c += 0.10 <= u < 0.15
        _, lo, hi = paired_delta_ci(n, b, c)
        hits += lo <= 0.05 <= hi
    assert 0.92 <= hits / trials <= 0.98


def _report(tmp_path, name, rows):
    preds = [{"id": i, "task": t, "family": f, "difficulty": 1, "answer": a, "response": "", "correct": ok,
              "finished": True, "n_tokens": 1} for i, f, t, a, ok in rows]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"model": name, "data": "d", "n": len(preds), "predictions": preds}))
    return path


def _pair(tmp_path):
    base = [("r0", "perception", "bbox", "1", True), ("r1", "perception", "bbox", "2", False),
            ("r2", "reasoning", "arith", "3", False), ("r3", "reasoning", "arith", "4", False),
            ("r4", "reasoning", "word_problem", "5", True)]
    new = [(i, f, t, a, ok) for i, f, t, a, ok in base]
    new[1] = ("r1", "perception", "bbox", "2", True)  # gained
    new[2] = ("r2", "reasoning", "arith", "3", True)  # gained
    new[4] = ("r4", "reasoning", "word_problem", "5", False)  # lost
    return _report(tmp_path, "base", base), _report(tmp_path, "new", new)


def test_diff_groups_by_family_and_task(tmp_path):
    a, b = _pair(tmp_path)
    rows = {r.group: r for r in diff_reports(load_report(a), load_report(b))}
    assert list(rows) == ["perception", "reasoning", "all"]
    assert (rows["perception"].n, rows["perception"].new_only, rows["perception"].base_only) == (2, 1, 0)
    assert (rows["reasoning"].new_only, rows["reasoning"].base_only, rows["reasoning"].delta) == (1, 1, 0.0)
    assert (rows["all"].n, rows["all"].base_correct, rows["all"].new_correct) == (5, 2, 3)
    assert rows["all"].delta == pytest.approx(1 / 5)
    by_task = {r.group: r for r in diff_reports(load_report(a), load_report(b), by="task")}
    assert set(by_task) == {"arith", "bbox", "word_problem", "all"} and by_task["word_problem"].base_only == 1


def test_diff_refuses_different_records(tmp_path):
    a, _ = _pair(tmp_path)
    other = _report(tmp_path, "other", [("r0", "perception", "bbox", "1", True), ("r9", "perception", "bbox", "2", True)])
    with pytest.raises(VlrlError, match="not scored on the same records.*r1"):
        diff_reports(load_report(a), load_report(other))
    relabelled = _report(tmp_path, "relabelled", [("r0", "perception", "bbox", "7", True), ("r1", "perception", "bbox", "2", False),
                                                  ("r2", "reasoning", "arith", "3", False), ("r3", "reasoning", "arith", "4", False),
                                                  ("r4", "reasoning", "word_problem", "5", True)])
    with pytest.raises(VlrlError, match="'r0' has a different answer"):
        diff_reports(load_report(a), load_report(relabelled))
    with pytest.raises(VlrlError, match="--by must be"):
        diff_reports(load_report(a), load_report(a), by="difficulty")


def test_load_report_names_the_bad_file(tmp_path):
    with pytest.raises(VlrlError, match="no eval report here"):
        load_report(tmp_path / "missing.json")
    (tmp_path / "stage").mkdir()
    with pytest.raises(VlrlError, match="stage/eval.json: no eval report"):
        load_report(tmp_path / "stage")
    (tmp_path / "x.json").write_text("{oops")
    with pytest.raises(VlrlError, match="x.json: not JSON"):
        load_report(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(VlrlError, match="y.json: not an eval report"):
        load_report(tmp_path / "y.json")


def test_compare_command(tmp_path):
    a, b = _pair(tmp_path)
    stage = tmp_path / "sft"
    stage.mkdir()
    (stage / "eval.json").write_text(b.read_text())  # a stage folder stands for its eval.json
    out = tmp_path / "diff.json"
    result = CliRunner().invoke(app, ["compare", str(a), str(stage), "--json", str(out)], terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "perception" in result.output and "+20.0" in result.output  # all: 40% -> 60%
    rows = json.loads(out.read_text())
    assert rows[-1]["group"] == "all" and rows[-1]["new_only"] == 2 and rows[-1]["base_only"] == 1
    bad = CliRunner().invoke(app, ["compare", str(a), str(tmp_path / "nope.json")])
    assert bad.exit_code != 0 and "no eval report here" in str(bad.exception)


def _steps(n, read, computed, slip, held):
    return {"n": n, "values_read": read, "computed": computed, "wrong": slip + held, "wrong_slip": slip,
            "wrong_steps_hold": held, "wrong_no_steps": 0}


def test_worked_steps_side_by_side_in_compare_and_vs_start(tmp_path):
    """Which of reading and arithmetic moved: both reports' step diagnoses, for the tasks both
    have; nothing when either report has none (an eval written before the diagnosis)."""
    a, b = _pair(tmp_path)
    base, new = json.loads(a.read_text()), json.loads(b.read_text())
    base["steps"] = {"arith": _steps(4, 2, 1, 2, 1), "text_arith": _steps(2, 2, 0, 2, 0)}
    new["steps"] = {"arith": _steps(4, 2, 3, 0, 1)}
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(new))
    table = steps_markdown(load_report(a), load_report(b))
    assert table.splitlines()[2] == "| arith | 4 | 50.0 -> 50.0 | 25.0 -> 75.0 | 50.0 -> 0.0 | 25.0 -> 25.0 |"
    assert len(table.splitlines()) == 3  # text_arith is in one report only
    assert steps_markdown(load_report(a), {"predictions": []}) == ""

    start, stage = tmp_path / "sft", tmp_path / "rl"
    for folder, src in ((start, a), (stage, b)):
        folder.mkdir()
        (folder / "eval.json").write_text(src.read_text())
    compare_with_start(stage, start)
    assert table in (stage / "vs_start.md").read_text()
    result = CliRunner().invoke(app, ["compare", str(a), str(b)], terminal_width=160)
    assert result.exit_code == 0 and "| arith | 4 | 50.0 -> 50.0 | 25.0 -> 75.0 |" in result.output

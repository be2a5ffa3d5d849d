"""The recipe runner end to end on the micro model: chain, skip, kill-and-resume, bad images."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from safetensors.torch import load_file

from vlrl.data.io import load_records
from vlrl.errors import DataError, RecipeError
from vlrl.recipe import apply_overrides, validate_recipe
from vlrl.runner import run_recipe
from vlrl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def micro_recipe(run_dir: Path, **pretrain) -> dict:
    return {
        "name": "micro",
        "run_dir": str(run_dir),
        "device": "cpu",
        "threads": 1,
        "tracking": {"tensorboard": True},
        "eval": {"data": "data", "limit": 12, "batch_size": 12, "max_new_tokens": 8},
        "stages": {
            "data": {"n": 80, "n_eval": 12, "seed": 1},
            "model": {"preset": "micro", "corpus_size": 300, "eval": False},
            "pretrain": {
                "from": "model",
                "data": "data",
                "batch_size": 4,
                "max_length": 160,
                "checkpoint_every": 2,
                "log_every": 1,
                "phases": [
                    {"name": "language", "trainable": "language", "select": {"families": ["text"]}, "loss_on": "all", "steps": 2},
                    {"name": "warmup", "trainable": "vision+projector", "select": {"families": ["perception"]}, "steps": 2},
                    {"name": "multitask", "trainable": "all", "steps": pretrain.pop("steps", 4)},
                ],
                **pretrain,
            },
        },
    }


def _write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlrl.cli", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_chain_runs_then_skips(tmp_path):
    raw = micro_recipe(tmp_path / "run")
    recipe = validate_recipe(raw)
    done = run_recipe(recipe)
    assert [d["stage"] for d in done] == ["data", "model", "pretrain"]
    pre = tmp_path / "run" / "pretrain"
    assert (pre / "checkpoint" / "config.json").is_file() and (pre / "DONE.json").is_file()
    ev = json.loads((pre / "eval.json").read_text())
    assert ev["n"] == 12 and 0.0 <= ev["accuracy"] <= 1.0
    # the answer-prior baseline from the data stage's train split sits beside every row
    assert ev["prior_from"].endswith("train.jsonl") and set(ev["prior"]) == set(ev["families"]) | set(ev["tasks"])
    rows = read_metrics(pre / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, 9))  # 2 + 2 + 4 optimizer steps, logged every step
    assert any((pre / "tb").iterdir())
    before = (pre / "DONE.json").read_text()
    again = run_recipe(recipe)
    assert (pre / "DONE.json").read_text() == before  # skipped, not rerun
    assert again[2]["fingerprint"] == done[2]["fingerprint"]


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "pretrain" / "checkpoint" / "model.safetensors"))


@pytest.mark.timeout(600)
def test_sigkill_then_rerun_resumes_bitwise(tmp_path):
    ref_recipe = _write(tmp_path, micro_recipe(tmp_path / "ref", steps=10), "ref.yaml")
    res = _cli("run", str(ref_recipe), "pretrain.eval=false")
    assert res.returncode == 0, res.stderr[-2000:]

    killed_recipe = _write(tmp_path, micro_recipe(tmp_path / "killed", steps=10), "killed.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "vlrl.cli", "run", str(killed_recipe), "pretrain.eval=false"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "killed" / "pretrain" / "state" / "trainer_state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["phase"] == 2 and json.loads(state.read_text())["step"] >= 2:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the run never reached a mid-phase checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "pretrain" / "DONE.json").exists()

    res = _cli("run", str(killed_recipe), "pretrain.eval=false")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout and "complete, skipped" in res.stdout  # data and model were not redone
    ref, got = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "killed")
    assert ref.keys() == got.keys()
    for k in ref:
        assert (ref[k] == got[k]).all(), k
    rows = read_metrics(tmp_path / "killed" / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 15))


def _break_one_image(run: Path) -> tuple[str, int]:
    lines = (run / "data" / "train.jsonl").read_text().splitlines()
    for row, line in enumerate(lines, start=1):
        rec = json.loads(line)
        if rec["images"]:
            (run / "data" / rec["images"][0]).write_bytes(b"not a png")
            return rec["images"][0], row
    raise AssertionError("no image record")


def test_corrupt_image_errors_with_file_and_row(tmp_path):
    raw = micro_recipe(tmp_path / "run")
    p = _write(tmp_path, raw)
    assert _cli("stage", "data", str(p)).returncode == 0
    assert _cli("stage", "model", str(p)).returncode == 0
    image, row = _break_one_image(tmp_path / "run")
    res = _cli("stage", "pretrain", str(p), "pretrain.phases.2.steps=40")
    assert res.returncode == 2
    assert "train.jsonl" in res.stderr and f"line {row}" in res.stderr and image in res.stderr
    assert "Traceback" not in res.stderr


def test_corrupt_image_skipped_and_counted(tmp_path):
    raw = micro_recipe(tmp_path / "run", on_bad_image="skip", steps=40)
    p = _write(tmp_path, raw)
    assert _cli("stage", "data", str(p)).returncode == 0
    assert _cli("stage", "model", str(p)).returncode == 0
    _break_one_image(tmp_path / "run")
    res = _cli("stage", "pretrain", str(p), "pretrain.eval=false")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_metrics(tmp_path / "run" / "pretrain" / "metrics.jsonl")
    assert rows[-1]["data/skipped"] >= 1


def test_stage_refuses_missing_input(tmp_path):
    p = _write(tmp_path, micro_recipe(tmp_path / "run"))
    res = _cli("stage", "pretrain", str(p))
    assert res.returncode == 2 and "needs stage 'model'" in res.stderr


def test_eval_stage_without_data_uses_the_data_stage(tmp_path):
    raw = micro_recipe(tmp_path / "run", steps=1)
    raw["stages"]["pretrain"]["eval"] = False
    raw["stages"]["final"] = {"kind": "eval", "from": "pretrain", "limit": 5, "max_new_tokens": 4}
    done = run_recipe(validate_recipe(raw))
    assert [d["stage"] for d in done] == ["data", "model", "pretrain", "final"]
    ev = json.loads((tmp_path / "run" / "final" / "eval.json").read_text())
    assert ev["n"] == 5 and ev["data"].endswith("eval.jsonl") and "pretrain" in ev["model"]


def test_a_phase_draws_from_its_own_data_stage(tmp_path):
    """MindVL's corpus per phase: the language phase reads a text-only data stage whose
    train split keeps the main data's held-out records out; the other phases read `data`."""
    raw = micro_recipe(tmp_path / "run", steps=1)
    stages = raw["stages"]
    raw["stages"] = {"data": stages["data"], "corpus": {"kind": "data", "n": 50, "n_eval": 4, "seed": 2, "mix": {"text": 1.0}, "exclude": ["data"]}} | {
        k: v for k, v in stages.items() if k != "data"}
    raw["stages"]["pretrain"]["phases"][0] |= {"data": "corpus", "select": {"tasks": ["text_arith"]}}
    raw["stages"]["pretrain"]["eval"] = False
    out = io.StringIO()
    run_recipe(validate_recipe(raw), console=Console(file=out, width=200))
    log = out.getvalue()
    n_arith = sum(r.task == "text_arith" for r in load_records(tmp_path / "run" / "corpus" / "train.jsonl"))
    n_main = sum(r.family == "text" for r in load_records(tmp_path / "run" / "data" / "train.jsonl"))
    assert n_arith != n_main and f"phase language: {n_arith} records" in log
    assert json.loads((tmp_path / "run" / "corpus" / "manifest.json").read_text())["excluded_keys"] == 12


def test_phase_data_must_name_an_earlier_data_stage(tmp_path):
    raw = micro_recipe(tmp_path / "run")
    raw["stages"]["pretrain"]["phases"][1]["data"] = "model"
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.phases\.1\.data: stage 'model' is a model stage"):
        validate_recipe(raw)
    raw["stages"]["pretrain"]["phases"][1]["data"] = "corpus"
    with pytest.raises(RecipeError, match=r"phases\.1\.data: 'corpus' names no earlier stage"):
        validate_recipe(raw)


def test_a_stage_compares_its_eval_with_its_starts(tmp_path):
    """A training stage started from an evaluated stage writes the paired comparison
    (vs_start.md / .json, DONE.json's summary) on the same eval records."""
    from vlrl.eval_diff import diff_reports, load_report

    raw = micro_recipe(tmp_path / "run", steps=2)
    raw["stages"]["more"] = {"kind": "pretrain", "from": "pretrain", "data": "data", "batch_size": 4, "max_length": 160,
                             "phases": [{"name": "more", "trainable": "language", "steps": 2}]}
    run_recipe(validate_recipe(raw), console=Console(file=io.StringIO()))
    run = tmp_path / "run"
    assert not (run / "pretrain" / "vs_start.md").exists()  # its start (the model stage) has no eval
    saved = json.loads((run / "more" / "vs_start.json").read_text())
    expected = diff_reports(load_report(run / "pretrain"), load_report(run / "more"))
    assert saved["rows"] == [r.model_dump() for r in expected]
    assert saved["rows"][-1]["n"] == 12
    summary = json.loads((run / "more" / "DONE.json").read_text())["summary"]["vs_start"]
    assert summary["all"]["delta"] == expected[-1].delta
    assert "| all | 12 |" in (run / "more" / "vs_start.md").read_text()


def test_a_dataset_folder_is_read_whole_by_its_data_stage(tmp_path):
    """A user's dataset (`data.path`) is checked row by row when its data stage runs, so a
    bad eval row stops the run before any training rather than at the first stage's eval."""
    from vlrl.data.synth import make_dataset

    mine = tmp_path / "mine"
    make_dataset(mine, seed=3, n=6, n_eval=3, families_mix={"text": 1.0})
    raw = {"name": "own", "run_dir": str(tmp_path / "run"), "device": "cpu", "stages": {"data": {"path": str(mine)}}}
    out = io.StringIO()
    done = run_recipe(validate_recipe(raw), console=Console(file=out, width=200))
    assert done[0]["summary"]["counts"] == {"train": {"total": 6, "family": {"text": 6}}, "eval": {"total": 3, "family": {"text": 3}}}
    assert "6 train, 3 eval records" in out.getvalue()

    rows = [json.loads(line) for line in (mine / "eval.jsonl").read_text().splitlines()]
    rows[1]["difficulty"] = "hard"
    (mine / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw["run_dir"] = str(tmp_path / "run2")
    with pytest.raises(DataError, match=r"eval\.jsonl line 2: field 'difficulty'"):
        run_recipe(validate_recipe(raw), console=Console(file=io.StringIO()))


def test_stage_skips_a_complete_stage_and_force_redoes_it(tmp_path):
    """`vlrl stage` on a complete stage whose config changed used to rerun only its eval and
    write the new config's fingerprint into DONE.json, over output made with the old one."""
    raw = micro_recipe(tmp_path / "run")
    raw["stages"] = {"data": raw["stages"]["data"]}
    p = _write(tmp_path, raw)
    done = tmp_path / "run" / "data" / "DONE.json"
    assert _cli("stage", "data", str(p)).returncode == 0
    before = done.read_text()
    res = _cli("stage", "data", str(p), "data.n=90")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "stage data: complete, skipped (its config changed since; rerun with --force)" in " ".join(res.stdout.split())
    assert done.read_text() == before and len(load_records(tmp_path / "run" / "data" / "train.jsonl")) == 80
    res = _cli("stage", "data", str(p), "data.n=90", "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "previous output moved to" in res.stdout and len(list((tmp_path / "run").glob("data.replaced-*"))) == 1
    assert len(load_records(tmp_path / "run" / "data" / "train.jsonl")) == 90
    assert json.loads(done.read_text())["fingerprint"] == validate_recipe(apply_overrides(raw, ["data.n=90"])).stage_fingerprint("data")


def test_a_stage_made_from_an_input_since_redone_says_so(tmp_path):
    """--force on a stage leaves the complete stages that read it as they were; the runner
    says so when it skips them, in the run that redoes the input and in any later one."""
    raw = micro_recipe(tmp_path / "run")
    raw["stages"] = {"data": raw["stages"]["data"], "corpus": {"kind": "data", "n": 20, "n_eval": 2, "seed": 2, "exclude": ["data"]}}
    recipe = validate_recipe(raw)

    def run(**kw) -> str:
        out = io.StringIO()
        run_recipe(recipe, console=Console(file=out, width=300), **kw)
        return out.getvalue()

    run()
    assert "made from an earlier output" not in run()
    assert "stage corpus: complete, skipped (made from an earlier output of data; --force corpus redoes it)" in run(force=["data"])
    assert "made from an earlier output of data" in run()  # still stale in a later run
    run(force=["corpus"])
    assert "made from an earlier output" not in run()


def test_a_dataset_folders_first_run_leaves_what_reads_it_current(tmp_path):
    """`vlrl stage` may run a stage before the data stage naming a folder has run (its output
    is the folder); that data stage's first run later changes nothing the stage read."""
    from vlrl.data.synth import make_dataset

    make_dataset(tmp_path / "mine", seed=3, n=6, n_eval=3, families_mix={"text": 1.0})
    raw = {"name": "own", "run_dir": str(tmp_path / "run"), "device": "cpu",
           "stages": {"mine": {"kind": "data", "path": str(tmp_path / "mine")}, "corpus": {"kind": "data", "n": 10, "n_eval": 2, "exclude": ["mine"]}}}
    recipe = validate_recipe(raw)
    run_recipe(recipe, console=Console(file=io.StringIO()), only=["corpus"])
    out = io.StringIO()
    run_recipe(recipe, console=Console(file=out, width=300))
    assert "stage corpus: complete, skipped\n" in out.getvalue()
    out = io.StringIO()
    run_recipe(recipe, console=Console(file=out, width=300), force=["mine"])
    assert "stage corpus: complete, skipped (made from an earlier output of mine" in out.getvalue()

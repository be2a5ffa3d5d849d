"""`parallel: N` (vlrl/stage_pool.py): independent stages run at once in their own processes,
with the results of a sequential run (every stage on the threads it would have alone), a
failing stage stops nothing already running, and a killed runner takes its stages with it."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from test_runner import ROOT, _write, micro_recipe
from vlrl.errors import VlrlError
from vlrl.recipe import load_recipe, validate_recipe
from vlrl.runner import run_recipe
from vlrl.stage_pool import _last_step, device_share, slots_for, stage_deps


def two_pretrains(run_dir: Path, parallel: int, steps_b: int = 4, threads: int | None = 1) -> dict:
    raw = micro_recipe(run_dir)
    raw.update(parallel=parallel, threads=threads, tracking={"tensorboard": False})
    pre = raw["stages"]["pretrain"]
    b = json.loads(json.dumps(pre))
    b["phases"][2]["steps"] = steps_b
    raw["stages"]["pretrain_b"] = {**b, "kind": "pretrain", "seed": 7}
    return raw


def test_deps_of_the_tiny_recipe():
    r = load_recipe(ROOT / "recipes" / "tiny.yaml")
    assert stage_deps(r, "model") == []
    assert stage_deps(r, "pretrain") == ["data", "arithmetic", "model"]  # a phase's data counts
    assert stage_deps(r, "sft") == ["data", "reading", "pretrain"]
    assert stage_deps(r, "merge") == ["data", "sft", "sft_lowres"]  # from a list, and its eval's data
    assert stage_deps(r, "rl") == ["data", "rl_prompts", "sft"]
    assert stage_deps(r, "reading") == ["data"]  # exclude


def test_an_eval_stage_without_data_waits_for_the_data_it_reads(tmp_path):
    """Its default eval data (the recipe's eval.data, else the first data stage) is an input:
    started beside the data stage, it failed on a dataset not written yet."""
    raw = {"name": "e", "run_dir": str(tmp_path / "run"), "stages": {"data": {"n": 10, "n_eval": 2},
           "ev": {"kind": "eval", "from": str(tmp_path / "ckpt")}}}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    r = validate_recipe(raw)
    assert stage_deps(r, "ev") == ["data"]
    res = subprocess.run([sys.executable, "-m", "vlrl.cli", "stage", "ev", str(_write(tmp_path, raw))], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "stage 'ev' needs stage 'data' (data), which is not complete" in res.stderr


def test_shares():
    assert slots_for("cpu", 1, 3) == 3 and slots_for("cuda", 8, 2) == 2
    assert slots_for("cuda", 1, 2) == 1 and slots_for("npu", 3, 4) == 3  # never two stages on one device
    assert device_share(8, 2, 1) == [4, 5, 6, 7]
    assert device_share(1, 2, 0) is None  # fewer devices than slots: they share


def test_last_step_reads_the_end_of_the_metrics(tmp_path):
    assert _last_step(tmp_path) is None
    rows = [{"step": s, "train/loss": 1.0, "pad": "x" * 300} for s in range(1, 40)] + [{"step": 0, "eval/accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "tra')
    assert _last_step(tmp_path) == 39  # past the eval's step-0 row and the torn line


def test_parallel_run_equals_sequential_and_overlaps(tmp_path):
    """At torch's default threads (every core): a stage run beside another computes on the
    threads it has alone, so its weights are the sequential run's bit for bit. When the pool
    split the cores (one thread each on 2 cores), on CPUs whose training floats depend on the
    thread count these differed."""
    fresh = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True, check=True).stdout)
    before = torch.get_num_threads()
    torch.set_num_threads(fresh)  # the sequential run computes in this process, where another test may have set it
    try:
        seq = run_recipe(validate_recipe(two_pretrains(tmp_path / "seq", parallel=1, threads=None)))
    finally:
        torch.set_num_threads(before)
    out = io.StringIO()
    par = run_recipe(validate_recipe(two_pretrains(tmp_path / "par", parallel=2, threads=None)), console=Console(file=out, force_terminal=True, width=160))
    table = out.getvalue()[out.getvalue().index("stages run at once"):]
    assert all(name in table for name in ("data", "model", "pretrain", "pretrain_b"))
    assert [d["stage"] for d in par] == [d["stage"] for d in seq] == ["data", "model", "pretrain", "pretrain_b"]
    for stage in ("pretrain", "pretrain_b"):
        a = load_file(str(tmp_path / "seq" / stage / "checkpoint" / "model.safetensors"))
        b = load_file(str(tmp_path / "par" / stage / "checkpoint" / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stage
        assert json.loads((tmp_path / "seq" / stage / "eval.json").read_text())["accuracy"] == par[[d["stage"] for d in par].index(stage)]["summary"]["eval"]["accuracy"]
        assert (tmp_path / "seq" / stage / "metrics.jsonl").read_text().count("\n") > 0
        drop_time = lambda path: [{k: v for k, v in json.loads(l).items() if "time" not in k and "per_s" not in k and "seconds" not in k} for l in path.read_text().splitlines()]  # noqa: E731
        assert drop_time(tmp_path / "seq" / stage / "metrics.jsonl") == drop_time(tmp_path / "par" / stage / "metrics.jsonl"), stage
    threads = {json.loads((tmp_path / mode / stage / "DONE.json").read_text())["threads"] for mode in ("seq", "par") for stage in ("pretrain", "pretrain_b")}
    assert threads == {fresh}, threads  # a fresh process's default: what each stage has alone
    # started together, not one after the other (the stages' own timings overlap only when a
    # stage outlasts the other's imports, so the runner's log is what is checked)
    log = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert log.index("stage pretrain_b (pretrain) started") < log.index("stage pretrain: done")
    assert log.index("stage model (model) started") < log.index("stage data: done")  # the model stage reads no data stage
    assert (tmp_path / "par" / "pretrain" / "stage.log").read_text().count("pretrain") > 0


def test_stages_import_the_runners_vlrl_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    decoy = tmp_path / "elsewhere" / "vlrl"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the vlrl of the working directory was imported')\n")
    monkeypatch.chdir(decoy.parent)
    done = run_recipe(validate_recipe(two_pretrains(tmp_path / "run", parallel=2)))
    assert [d["stage"] for d in done] == ["data", "model", "pretrain", "pretrain_b"]


def test_a_failing_stage_lets_the_running_one_finish(tmp_path):
    raw = two_pretrains(tmp_path / "run", parallel=2, steps_b=30)
    raw["stages"]["pretrain"]["phases"][0]["select"] = {"tasks": ["no_such_task"]}  # fails at its start
    raw["stages"]["after"] = {"kind": "eval", "from": "pretrain_b", "data": "data", "limit": 4}
    with pytest.raises(VlrlError) as err:
        run_recipe(validate_recipe(raw))
    msg = str(err.value)
    assert "stage 'pretrain' failed" in msg and "pretrain/stage.log" in msg and "no_such_task" in msg
    assert (tmp_path / "run" / "pretrain_b" / "DONE.json").is_file()  # kept running to the end
    assert not (tmp_path / "run" / "after").exists()  # nothing new started


def test_stages_beside_each_other_wait_without_spinning(tmp_path, monkeypatch):
    """Two stages on every core each: OpenMP's spinning wait made both 5x slower
    (bench/bench_parallel_stages.py). A stage started alone stays alone and keeps the faster
    spinning wait; a user's own setting is kept."""
    seen = []
    real = subprocess.Popen

    def spy(cmd, **kw):
        seen.append(kw["env"].get("OMP_WAIT_POLICY"))
        return real(cmd, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)

    def recipe(run_dir: Path) -> dict:
        raw = two_pretrains(run_dir, parallel=2)
        raw["stages"]["merged"] = {"kind": "merge", "from": ["pretrain", "pretrain_b"], "eval": False}  # waits for both: alone
        return raw

    run_recipe(validate_recipe(recipe(tmp_path / "a")))  # data beside model, pretrain beside pretrain_b, then merged
    assert seen == ["PASSIVE"] * 4 + [None]
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run_recipe(validate_recipe(recipe(tmp_path / "b")))
    assert seen[5:] == ["ACTIVE"] * 5


def _children(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "vlrl.stage_child" in cmd and marker in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.timeout(600)
def test_killing_the_runner_kills_its_stages_and_a_rerun_finishes(tmp_path):
    recipe = _write(tmp_path, two_pretrains(tmp_path / "run", parallel=2, steps_b=200))
    proc = subprocess.Popen([sys.executable, "-m", "vlrl.cli", "run", str(recipe)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "pretrain_b" / "state" / "trainer_state.json"
    deadline = time.time() + 300
    while not state.is_file() and time.time() < deadline:
        time.sleep(0.05)
    assert state.is_file(), "pretrain_b never checkpointed"
    assert _children(str(tmp_path))
    os.kill(proc.pid, signal.SIGKILL)  # the runner alone, as a scheduler or OOM killer would
    proc.wait()
    deadline = time.time() + 20
    while _children(str(tmp_path)) and time.time() < deadline:
        time.sleep(0.1)
    assert _children(str(tmp_path)) == []
    assert not (tmp_path / "run" / "pretrain_b" / "DONE.json").exists()
    res = subprocess.run([sys.executable, "-m", "vlrl.cli", "run", str(recipe)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "resuming" in res.stdout
    assert (tmp_path / "run" / "pretrain_b" / "DONE.json").is_file()

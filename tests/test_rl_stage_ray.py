"""The RL stage on Ray (placement colocate): a killed rollout actor is restarted and its
step retried; a SIGKILLed driver resumes on rerun. Each starts a local Ray cluster and
actor processes (~10-20 s of start-up on 2 cores), hence slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml

from rollout.store import RolloutStore
from test_rl_stage import PROMPTS, N, _run, _weights, build_micro_start, rl_recipe
from vlrl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return build_micro_start(tmp_path_factory.mktemp("rlstart"))


def _rows(stage_dir: Path) -> list[tuple]:
    with RolloutStore(stage_dir / "rollouts.sqlite", readonly=True) as store:
        return sorted((r.step, r.group_id, r.sample_index, r.policy_version, r.response, r.total_reward, r.advantage) for r in store.query(limit=10_000))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_rollout_actor_is_restarted_and_its_step_retried(start, tmp_path, monkeypatch):
    from rlhf import stage as stage_mod

    data, ckpt = start
    inline = _run(rl_recipe(tmp_path / "inline", data, ckpt))
    real_step = stage_mod.Controller.step
    killed = []

    def step_with_a_crash(self, s):
        if s == 1:  # the worker dies holding version 1; it comes back with version 0
            pid = ray.get(self.pool.workers[0].actor.pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return real_step(self, s)

    monkeypatch.setattr(stage_mod.Controller, "step", step_with_a_crash)
    out = _run(rl_recipe(tmp_path / "ray", data, ckpt, placement="colocate", ray={"num_cpus": 2}))
    assert killed and not ray.is_initialized()  # the stage stopped the Ray it started
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["rollout/restarts"] for m in metrics] == [0.0, 1.0, 1.0]
    # The retried step sampled with the resent weights of version 1, so colocate-with-a-crash
    # and inline give the same rollouts and the same final weights.
    assert _rows(out) == _rows(inline)
    a, b = _weights(inline / "checkpoint"), _weights(out / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_of_the_driver_then_rerun_resumes_from_the_last_checkpoint(start, tmp_path):
    data, ckpt = start
    steps = 8
    ref = _run(rl_recipe(tmp_path / "ref", data, ckpt, steps=steps))

    raw = rl_recipe(tmp_path / "killed", data, ckpt, steps=steps, placement="colocate", ray={"num_cpus": 2})
    recipe = tmp_path / "killed.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "vlrl.cli", "run", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "killed" / "rl" / "state" / "rl_state.json"
    deadline = time.time() + 400
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["step"] >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before its first checkpoint")
        time.sleep(0.05)
    else:
        pytest.fail("the run never reached a checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)  # mid-stage: steps 2..7 are still to run
    proc.wait()
    stage = tmp_path / "killed" / "rl"
    assert not json.loads(state.read_text())["complete"] and not (stage / "DONE.json").exists()

    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout
    assert _rows(stage) == _rows(ref)  # no step lost, none doubled, each as it would have been
    assert len(_rows(stage)) == steps * PROMPTS * N
    a, b = _weights(ref / "checkpoint"), _weights(stage / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in read_metrics(stage / "metrics.jsonl")] == list(range(1, steps + 1))


@pytest.mark.slow
def test_a_rollout_worker_that_cannot_start_is_reported_and_ray_stopped(start, tmp_path):
    from vlrl.errors import VlrlError

    data, ckpt = start
    raw = rl_recipe(tmp_path / "r", data, ckpt, placement="colocate", rollout={"engine_options": {"bogus": 1}})
    with pytest.raises(VlrlError, match="rollout worker 0 failed to start: .*bogus"):
        _run(raw)
    assert not ray.is_initialized()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_split_placement_gives_the_rollouts_and_weights_of_inline(start, tmp_path):
    """In `split` every worker is its own actor (two rollout workers, trainer, reference,
    rewards) and weights travel through Ray's object store: the run must still be the
    inline one, row for row and bit for bit."""
    data, ckpt = start
    # Two workers in both: each worker's share is one batch with its own seeded draws.
    two = {"algo": {"kl": {"coef": 0.05}}, "rollout": {"workers": 2}}
    inline = _run(rl_recipe(tmp_path / "inline", data, ckpt, **two))
    out = _run(rl_recipe(tmp_path / "split", data, ckpt, placement="split", ray={"num_cpus": 2}, **two))
    assert not ray.is_initialized()
    assert _rows(out) == _rows(inline)
    a, b = _weights(inline / "checkpoint"), _weights(out / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = read_metrics(out / "metrics.jsonl")
    assert all(m["actor/kl_loss"] > 0 for m in metrics[1:])  # the reference actor answered
    assert [m["policy/version"] for m in metrics] == [m["policy/version"] for m in read_metrics(inline / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_stage_joins_a_running_ray_cluster_and_leaves_it_running(start, tmp_path, monkeypatch):
    """`ray.address: host:port` joins a cluster started elsewhere (`ray start --head`, which
    in Ray >= 2.5x turns on token authentication; the joining side says so with
    RAY_AUTH_MODE=token): the run is the inline one, and the cluster outlives the stage."""
    from rlhf.placement import free_port

    data, ckpt = start
    inline = _run(rl_recipe(tmp_path / "inline", data, ckpt))
    port = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # for `ray status` and the run below

    def cluster_up() -> bool:
        return subprocess.run([str(ray_bin), "status", f"--address={address}"], capture_output=True).returncode == 0

    try:
        deadline = time.time() + 120
        while not cluster_up():
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(1)
        # In its own process: Ray reads RAY_AUTH_MODE once per process.
        recipe = tmp_path / "joined.yaml"
        recipe.write_text(yaml.safe_dump(rl_recipe(tmp_path / "joined", data, ckpt, placement="colocate", ray={"address": address})))
        res = subprocess.run([sys.executable, "-m", "vlrl.cli", "run", str(recipe)], cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        out = tmp_path / "joined" / "rl"
        assert cluster_up()  # the cluster it joined runs on after the stage
        assert _rows(out) == _rows(inline)
        a, b = _weights(inline / "checkpoint"), _weights(out / "checkpoint")
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        # The head leaves its address in Ray's temp dir, where a later bare ray.init() would look.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()

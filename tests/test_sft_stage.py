"""The SFT stage end to end on the micro model: packing metrics, plan, eval, and a SIGKILL
at a mid-phase checkpoint followed by a rerun that ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlrl.errors import RecipeError
from vlrl.recipe import validate_recipe
from vlrl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu"  # tests/test_cuda.py reruns some of these tests with "cuda"


def sft_config(src: str = "model", data: str = "data", **over) -> dict:
    return {
        "from": src,
        "data": data,
        "batch_size": 2,
        "max_length": 160,
        "checkpoint_every": 1,
        "log_every": 1,
        "packing": {"enabled": True, "max_length": 320, "max_image_tokens": 48},
        "replay": {"general": 0.2, "perception": 0.2},
        "phases": [
            {"name": "easy", "select": {"families": ["reasoning"], "difficulty": [1, 2]}, "steps": 3},
            {"name": "all", "select": {"families": ["reasoning"]}, "steps": 4, "optim": {"lr": 3e-4, "warmup_steps": 1}},
        ],
        "restore": {"steps": 2},
        **over,
    }


def recipe(run_dir: Path, stages: dict) -> dict:
    return {
        "name": "sft-micro",
        "run_dir": str(run_dir),
        "device": DEVICE,
        "threads": 1,
        "tracking": {"tensorboard": False},
        "eval": {"data": "data", "limit": 12, "batch_size": 12, "max_new_tokens": 8},
        "stages": stages,
    }


BASE = {"data": {"n": 80, "n_eval": 12, "seed": 1}, "model": {"preset": "micro", "corpus_size": 300, "eval": False}}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlrl.cli", *args], capture_output=True, text=True, cwd=ROOT)


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sft_config_is_strict(tmp_path):
    raw = recipe(tmp_path / "x", BASE | {"sft": sft_config(phases=[{"name": "a", "steps": 1, "stepz": 2}])})
    with pytest.raises(RecipeError, match="stages.sft.phases.0.stepz: unknown key"):
        validate_recipe(raw, "r.yaml")
    raw = recipe(tmp_path / "x", BASE | {"sft": sft_config(packing={"enabled": True, "max_length": 100})})
    with pytest.raises(RecipeError, match="packing.max_length"):
        validate_recipe(raw, "r.yaml")
    raw = recipe(tmp_path / "x", BASE | {"sft": sft_config(replay={"general": 0.6, "perception": 0.5})})
    with pytest.raises(RecipeError, match="replay"):
        validate_recipe(raw, "r.yaml")


@pytest.mark.timeout(120)
def test_sigkill_then_rerun_resumes_bitwise(tmp_path):
    """Reference run (data, model, SFT with packing), then the same SFT killed at a
    mid-phase checkpoint and rerun: same weights bit for bit, same data stream."""
    ref = _write(tmp_path / "ref.yaml", recipe(tmp_path / "ref", BASE | {"sft": sft_config(eval=False)}))
    res = _cli("run", str(ref))
    assert res.returncode == 0, res.stderr[-2000:]
    src, data = str(tmp_path / "ref" / "model" / "checkpoint"), str(tmp_path / "ref" / "data")
    killed = _write(tmp_path / "killed.yaml", recipe(tmp_path / "killed", {"sft": sft_config(src, data, eval=False)}) | {"eval": {"data": data}})

    proc = subprocess.Popen([sys.executable, "-m", "vlrl.cli", "run", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "killed" / "sft" / "state" / "trainer_state.json"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            st = json.loads(state.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            st = {}
        if st.get("phase") == 1 and st.get("step", 0) >= 2:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the run never reached a mid-phase checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "sft" / "DONE.json").exists()
    assert st["cursor"] > 0  # the tracker was saved with the checkpoint

    res = _cli("run", str(killed))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout
    a = load_file(str(tmp_path / "ref" / "sft" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "sft" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k

    # Same data stream: per-step cursor and consumed counts match the uninterrupted run.
    def stream(run: str) -> dict:
        rows = read_metrics(tmp_path / run / "sft" / "metrics.jsonl")
        return {r["step"]: (r["data/cursor"], r["data/consumed"]) for r in rows if "data/cursor" in r}

    ref_stream, got = stream("ref"), stream("killed")
    assert sorted(ref_stream) == list(range(1, 10))
    for step, v in got.items():  # the killed run logged steps before the kill and after the rerun
        assert ref_stream[step] == v, step
    assert set(got) == set(ref_stream)
    done = json.loads((tmp_path / "killed" / "sft" / "DONE.json").read_text())["summary"]
    assert done["consumed"] == json.loads((tmp_path / "ref" / "sft" / "DONE.json").read_text())["summary"]["consumed"]


def test_stage_writes_plan_metrics_and_eval(tmp_path):
    from vlrl.runner import run_recipe

    done = run_recipe(validate_recipe(recipe(tmp_path / "run", BASE | {"sft": sft_config()})))
    assert [d["stage"] for d in done] == ["data", "model", "sft"]
    sft = tmp_path / "run" / "sft"
    plan = json.loads((sft / "plan.json").read_text())
    assert [p["name"] for p in plan] == ["easy", "all", "restore"]
    assert plan[0]["families"]["text"] == pytest.approx(0.2) and plan[2]["families"]["text"] == pytest.approx(0.5)
    rows = [r for r in read_metrics(sft / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert all(0.5 < r["train/pack_efficiency"] <= 1.0 for r in rows)
    assert rows[3]["train/lr"] == pytest.approx(3e-4)  # phase "all" has its own lr (warm-up of 1 step)
    assert json.loads((sft / "eval.json").read_text())["n"] == 12
    assert done[2]["summary"]["consumed"] == rows[-1]["data/consumed"] > 9 * 2  # packing puts > 1 record in a row


def test_max_pixels_trains_at_its_own_resolution_and_merges(tmp_path):
    """MindVL's merge of SFT runs at different max_pixels: the low-resolution run's
    batches and written processor use its bounds, the other run keeps the checkpoint's.
    The low-resolution run also computes in bf16 with recomputed activations (the real
    recipes' keys): its checkpoint still holds float32 weights."""
    import numpy as np
    from PIL import Image

    from vlrl.model.loading import load_processor
    from vlrl.runner import run_recipe

    short = {"phases": [{"name": "all", "steps": 2}], "restore": None}
    low = 4 * 28 * 28  # 4 image tokens: a 112x112 image shrinks to 56x56
    stages = BASE | {"sft": sft_config(**short), "sft_low": sft_config(**short, kind="sft", max_pixels=low, dtype="bfloat16", gradient_checkpointing=True),
                     "merge": {"from": ["sft", "sft_low"], "eval": False}}
    raw = recipe(tmp_path / "run", stages)
    raw["stages"]["sft_low"]["eval"] = False
    run_recipe(validate_recipe(raw))
    img = Image.fromarray(np.zeros((112, 112, 3), dtype=np.uint8))

    def image_tokens(ckpt) -> int:
        p = load_processor(ckpt)
        thw = p.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0]
        return int(thw.prod()) // p.image_processor.merge_size ** 2

    run = tmp_path / "run"
    assert image_tokens(run / "sft" / "checkpoint") == 16
    assert image_tokens(run / "sft_low" / "checkpoint") == 4
    assert load_processor(run / "sft_low" / "checkpoint").image_processor.size["longest_edge"] == low
    rows = [r for r in read_metrics(run / "sft_low" / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
    a = load_file(run / "sft" / "checkpoint" / "model.safetensors")
    b = load_file(run / "sft_low" / "checkpoint" / "model.safetensors")
    m = load_file(run / "merge" / "checkpoint" / "model.safetensors")
    k = next(k for k in a if "layers.0.mlp" in k)
    assert not torch.equal(a[k], b[k])
    assert a[k].dtype == b[k].dtype == torch.float32
    torch.testing.assert_close(m[k], (a[k] + b[k]) / 2)


def test_crossed_pixel_bounds_are_refused(tmp_path):
    raw = recipe(tmp_path / "x", BASE | {"sft": sft_config(min_pixels=5000, max_pixels=4000)})
    with pytest.raises(RecipeError, match="min_pixels"):
        validate_recipe(raw, "r.yaml")


def test_a_phase_reads_its_own_data_stage(tmp_path):
    """`data:` on an SFT phase: that phase's selection comes from another data stage (its
    own corpus), replay from the stage's data; the plan says which file each phase used."""
    from vlrl.runner import run_recipe

    phases = [{"name": "own", "data": "extra", "select": {"families": ["reasoning"]}, "steps": 2},
              {"name": "main", "select": {"families": ["reasoning"]}, "steps": 2}]
    stages = BASE | {"extra": {"kind": "data", "n": 30, "n_eval": 2, "seed": 5, "mix": {"reasoning": 1.0}},
                     "sft": sft_config(phases=phases, eval=False)}
    run_recipe(validate_recipe(recipe(tmp_path / "run", stages)))
    plan = json.loads((tmp_path / "run" / "sft" / "plan.json").read_text())
    assert [Path(p["source"]).parent.name for p in plan[:2]] == ["extra", "data"] and plan[2]["source"] == "phases"
    assert all(Path(p["replay_source"]).parent.name == "data" for p in plan)
    assert plan[0]["families"]["reasoning"] == pytest.approx(0.6)

    bad = BASE | {"sft": sft_config(phases=[{"name": "own", "data": "nowhere", "steps": 1}])}
    with pytest.raises(RecipeError, match="stages.sft.phases.0.data: 'nowhere' names no earlier stage"):
        validate_recipe(recipe(tmp_path / "bad", bad), "r.yaml")


def test_a_component_at_lr_mult_zero_is_frozen_for_its_phase(tmp_path, monkeypatch):
    """Phase `easy` freezes the tower (lr_mult 0: no gradients, so no backward through it
    and no share of the clipping norm); phase `all` sets its own optim without it and
    trains everything. The tower's weights come out unchanged only where it was frozen."""
    import sft.sft_stage as stage_mod
    from sft.trainer import trained_components
    from vlrl.errors import VlrlError
    from vlrl.recipe_base import OptimSpec
    from vlrl.runner import run_recipe

    seen = []
    real = stage_mod.train_steps

    def spy(forward, optimizer, *args, **kwargs):
        model = forward.model
        tower = [p.requires_grad for n, p in model.named_parameters() if ".visual." in f".{n}"]
        grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        seen.append((all(tower), not any(tower), all(id(p) in grouped for p in model.parameters() if p.requires_grad),
                     any(id(p) in grouped for n, p in model.named_parameters() if ".visual." in f".{n}")))
        return real(forward, optimizer, *args, **kwargs)

    monkeypatch.setattr(stage_mod, "train_steps", spy)
    cfg = sft_config(optim={"lr": 1e-3, "warmup_steps": 1, "lr_mult": {"vision": 0.0, "projector": 0.0}}, restore=None)
    run_recipe(validate_recipe(recipe(tmp_path / "run", BASE | {"sft": cfg})))
    # easy: tower frozen and out of the optimizer; all (own optim, no lr_mult): everything trained
    assert seen[0] == (False, True, True, False) and seen[1] == (True, False, True, True)

    assert trained_components(OptimSpec(lr_mult={"vision": 0.0}), "x") == ("projector", "language")
    with pytest.raises(VlrlError, match="every component is at 0"):
        trained_components(OptimSpec(lr_mult={"vision": 0.0, "projector": 0.0, "language": 0.0}), "stages.sft.phases.easy")

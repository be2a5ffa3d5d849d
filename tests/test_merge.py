"""Weight merging: the weighted average itself, refusals naming checkpoint and tensor or
key, the `vlrl merge` command, and the merge stage's table of parts vs merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sft.merge import compare_table, merge_checkpoints
from vlrl.errors import VlrlError
from vlrl.model.loading import load_model
from vlrl.model.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["What number is shown?", "3 + 4 = 7. \\boxed{7}", "Be brief."] * 40


def _ckpt(path: Path, seed: int, preset: str = "micro") -> Path:
    model, processor = build_tiny_model(CORPUS, preset=preset, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    return _ckpt(d / "a", 0), _ckpt(d / "b", 1)


def test_weighted_average_and_copied_processor(two, tmp_path):
    a, b = two
    out = merge_checkpoints([a, b], tmp_path / "m", weights=[1, 3])
    ta, tb, tm = (load_file(str(p / "model.safetensors")) for p in (a, b, out))
    assert tm.keys() == ta.keys()
    k = next(k for k in ta if ta[k].ndim == 2 and not torch.equal(ta[k], tb[k]))
    assert torch.allclose(tm[k], 0.25 * ta[k] + 0.75 * tb[k], atol=1e-7)
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (a / name).read_bytes()
    assert json.loads((out / "vlrl_merge.json").read_text())["weights"] == [0.25, 0.75]
    load_model(out, device="cpu")  # a normal checkpoint


def test_equal_weights_by_default_and_self_merge_is_identity(two, tmp_path):
    a, _ = two
    out = merge_checkpoints([a, a, a], tmp_path / "m")
    ta, tm = load_file(str(a / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in ta:
        assert torch.allclose(ta[k], tm[k], atol=1e-6), k


def test_config_mismatch_names_checkpoint_and_key(two, tmp_path):
    a, _ = two
    other = _ckpt(tmp_path / "tiny", 0, preset="tiny")
    with pytest.raises(VlrlError) as e:
        merge_checkpoints([a, other], tmp_path / "m")
    msg = str(e.value)
    assert str(other) in msg and "config.json differs" in msg and "hidden_size" in msg and "\n" not in msg
    assert not (tmp_path / "m").exists()


def test_shape_mismatch_names_the_tensor(two, tmp_path):
    a, _ = two
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in a.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(a / "model.safetensors"))
    key = next(k for k in tensors if tensors[k].ndim == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VlrlError, match=rf"checkpoint {bad}: tensor {key} has shape"):
        merge_checkpoints([a, bad], tmp_path / "m")


def test_cli_merge_and_its_errors(two, tmp_path):
    a, b = two
    run = lambda *args: subprocess.run([sys.executable, "-m", "vlrl.cli", "merge", *args], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    res = run(str(a), str(b), "--out", str(tmp_path / "m"), "--weights", "0.5,0.5")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    res = run(str(a), str(b), "--out", str(tmp_path / "m2"), "--weights", "1,2,3")
    assert res.returncode == 2 and "3 weights for 2 checkpoints" in res.stderr and "Traceback" not in res.stderr


def test_compare_table_lists_parts_and_merge():
    rows = [
        {"name": "sft_a", "weight": 0.5, "accuracy": 0.2, "by_family": {"reasoning": 0.3}, "n": 10},
        {"name": "merge (merged)", "weight": None, "accuracy": 0.25, "by_family": {"reasoning": 0.4}, "n": 10},
    ]
    table = compare_table(rows)
    assert "| sft_a | 0.5 | 20.0 | 30.0 | 10 |" in table and "| merge (merged) |  | 25.0 | 40.0 | 10 |" in table


def test_merge_stage_writes_its_eval_beside_the_parts(tmp_path):
    from vlrl.recipe import validate_recipe
    from vlrl.runner import run_recipe

    sft = {"kind": "sft", "from": "model", "data": "data", "batch_size": 2, "max_length": 160, "log_every": 1,
           "phases": [{"name": "p", "select": {"families": ["reasoning"]}, "steps": 2}]}
    raw = {
        "name": "m", "run_dir": str(tmp_path / "run"), "device": "cpu", "threads": 1, "tracking": {"tensorboard": False},
        "eval": {"data": "data", "limit": 6, "batch_size": 6, "max_new_tokens": 4},
        "stages": {
            "data": {"n": 60, "n_eval": 6, "seed": 2},
            "model": {"preset": "micro", "corpus_size": 300, "eval": False},
            "sft_short": sft,
            "sft_packed": sft | {"packing": {"enabled": True, "max_length": 320}},
            "merge": {"from": ["sft_short", "sft_packed"], "weights": [1, 1]},
        },
    }
    done = run_recipe(validate_recipe(raw))
    assert [d["stage"] for d in done][-1] == "merge"
    stage = tmp_path / "run" / "merge"
    rows = json.loads((stage / "compare.json").read_text())
    assert [r["name"] for r in rows] == ["sft_short", "sft_packed", "merge (merged)"]
    assert rows[0]["source"].endswith("sft_short/eval.json")  # the part's own eval was reused
    assert all(r["n"] == 6 for r in rows)
    assert "merge (merged)" in (stage / "compare.md").read_text()
    assert (stage / "checkpoint" / "model.safetensors").is_file()


def test_merge_stage_config_errors():
    from vlrl.errors import RecipeError
    from vlrl.recipe import validate_recipe

    raw = {"name": "m", "stages": {"merge": {"from": ["a", "b"], "weights": [1]}}}
    with pytest.raises(RecipeError, match="1 weights for 2 parts"):
        validate_recipe(raw, "r.yaml")
    raw = {"name": "m", "stages": {"merge": {"from": ["a"]}}}
    with pytest.raises(RecipeError, match="stages.merge.from"):
        validate_recipe(raw, "r.yaml")

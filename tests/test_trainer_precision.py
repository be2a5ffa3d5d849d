"""Pretraining and SFT share the RL trainer's precision keys: `dtype` is autocast's, the
parameters and AdamW state stay float32 (so fine-tuning-sized steps land), and
`gradient_checkpointing` recomputes activations without changing the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sft.trainer import compute_context, make_optimizer, optimizer_step, prepare_for_training
from vlrl.data.images import Sample
from vlrl.data.records import Record
from vlrl.model.batching import collate_for_training
from vlrl.model.packing import PackedForward, collate_packed, encode_segments
from vlrl.model.tiny import build_tiny_model
from vlrl.recipe import OptimSpec, PretrainStage
from vlrl.recipe_sft import SftStage

CORPUS = ["What number is shown?", "Add the numbers. 7 + 5 = 12. \\boxed{12}", "Be brief."] * 40


def _samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i, (n_img, q, a) in enumerate([(1, "What number is shown?", "\\boxed{482}"), (0, "Be brief.", "\\boxed{7}"),
                                       (2, "Add the numbers.", "7 + 5 = 12. \\boxed{12}")]):
        msgs = [{"role": "user", "content": [{"type": "image"}] * n_img + [{"type": "text", "text": q}]}, {"role": "assistant", "content": a}]
        rec = Record(id=f"r{i}", messages=msgs, images=[f"{i}_{k}.png" for k in range(n_img)], answer="1")
        out.append(Sample(rec, [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(n_img)], i + 1))
    return out


def _fresh(gradient_checkpointing: bool):
    torch.manual_seed(0)
    model, processor = build_tiny_model(CORPUS, preset="micro", seed=0)
    return prepare_for_training(model, gradient_checkpointing=gradient_checkpointing), processor


def _step(model, batch, *, lr: float, dtype=torch.float32):
    model.train()
    spec = OptimSpec(lr=lr, weight_decay=0.0, grad_clip=None)
    opt = make_optimizer(model.named_parameters(), spec)
    return optimizer_step(model, opt, [batch], lr=lr, grad_clip=None, compute_dtype=dtype)


def test_schema_has_the_keys_with_float32_default():
    for cls in (PretrainStage, SftStage):
        assert cls.model_fields["dtype"].default == "float32"
        assert cls.model_fields["gradient_checkpointing"].default is False
    for bad in ("int8", "float16"):  # float16 would need loss scaling, which the trainers do not do
        with pytest.raises(ValueError, match="dtype"):
            SftStage.model_validate({"from": "m", "data": "d", "phases": [{"name": "a", "steps": 1}], "dtype": bad})


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_gives_the_same_step(packed):
    samples = _samples()
    results, weights = [], []
    for ckpt in (False, True):
        model, processor = _fresh(ckpt)
        assert model.model.language_model.gradient_checkpointing is ckpt
        if packed:
            segs = encode_segments(samples, processor, max_length=256)
            batch = collate_packed([segs], processor, max_length=sum(s.length for s in segs), rope_index=model.model.get_rope_index).inputs
            fwd = PackedForward(model)
        else:
            batch, fwd = collate_for_training(samples, processor, max_length=256), model
        results.append(_step(fwd, batch, lr=1e-2))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    a, b = results
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.tokens == b.tokens
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for n, w in weights[0].items():
        torch.testing.assert_close(weights[1][n], w, rtol=0, atol=1e-6, msg=n)


def test_bf16_compute_moves_float32_master_weights_at_a_fine_tuning_lr():
    samples = _samples()
    model, processor = _fresh(False)
    model.to(torch.bfloat16)  # as a real checkpoint arrives
    prepare_for_training(model, gradient_checkpointing=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = collate_for_training(samples, processor, max_length=256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))  # returns None: output kept
    res = _step(model, batch, lr=1e-6, dtype=torch.bfloat16)
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the forward ran in bf16 ...
    assert np.isfinite(res.loss) and res.grad_norm > 0
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    total = sum(t.numel() for t in before.values())
    assert moved / total > 0.9, f"only {moved / total:.1%} of the weights moved"  # ... the update landed in fp32


def test_float32_compute_is_no_autocast():
    with compute_context(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with compute_context(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_pretrain_stage_with_bf16_compute_and_checkpointing(tmp_path):
    """The keys reach the pretraining stage, whose phases freeze parts of the model (the
    recomputed layers then have inputs that need no gradient)."""
    from safetensors.torch import load_file
    from test_runner import micro_recipe

    from vlrl.recipe import validate_recipe
    from vlrl.runner import run_recipe
    from vlrl.tracking import read_metrics

    raw = micro_recipe(tmp_path / "run", steps=2, dtype="bfloat16", gradient_checkpointing=True)
    raw["stages"]["pretrain"]["eval"] = False
    run_recipe(validate_recipe(raw))
    pre = tmp_path / "run" / "pretrain"
    rows = [r for r in read_metrics(pre / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 6 and all(np.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in rows)
    start = load_file(str(tmp_path / "run" / "model" / "checkpoint" / "model.safetensors"))
    end = load_file(str(pre / "checkpoint" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in end.values())
    assert sum(not torch.equal(start[k], end[k]) for k in start) > len(start) // 2

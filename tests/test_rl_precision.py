"""`dtype: bfloat16` is the trainer's compute dtype, not its parameters': AdamW updates
float32 master weights, so an RL-sized step (lr 1e-6) still moves them. (With bf16
parameters ~98% of weights stay put at that lr: an update below half a bf16 ulp rounds away.)"""

from __future__ import annotations

import torch

from test_fsdp_two_ranks import _policy_batch


def test_bf16_compute_keeps_float32_master_weights_that_small_steps_move(tmp_path):
    from rlhf.workers import PolicyTrainer
    from vlrl.model.tiny import init_tiny_model
    from vlrl.recipe_base import OptimSpec
    from vlrl.rl_config import RLAlgoConfig

    torch.set_num_threads(1)
    model_dir = init_tiny_model(tmp_path / "model", ["What is 2 plus 2? Count. It is 4."] * 20, preset="micro", seed=0)
    batch = _policy_batch(model_dir)
    adv = torch.linspace(-1, 1, batch.rows * batch.response_width).view(batch.rows, -1)  # (B, R)
    optim = OptimSpec(lr=1e-6, warmup_steps=0, schedule="constant", grad_clip=None, weight_decay=0.0)
    trainer = PolicyTrainer(model_dir, device="cpu", algo=RLAlgoConfig(), optim=optim, dtype="bfloat16", micro_batch_size=2)
    assert trainer.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    seen = {}
    hook = trainer.model.lm_head.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))  # returns None: output kept
    trainer.update(batch, adv, ref_logprobs=None, kl_coef=0.0, lr=1e-6, step=0)
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the forward ran in bf16 ...
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in trainer.model.named_parameters() if n in before)
    total = sum(t.numel() for t in before.values())
    assert moved / total > 0.9, f"only {moved / total:.1%} of the weights moved"  # ... the update landed in fp32
    # The same step on bf16 parameters would round most of it away (what this guards against).
    w = torch.cat([t.flatten() for t in before.values()])
    assert float(((w.bfloat16() + 1e-6 * w.sign().bfloat16()) != w.bfloat16()).float().mean()) < 0.1

"""Rollout/training mismatch: the sampler (vLLM, bf16, its own kernels) and the trainer
(fp32/bf16 FSDP) give the same tokens different logprobs. We log the gap every step and
can correct for it with truncated importance sampling (TIS, Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training").

Weights and rejection masks come from verl's `rollout_corr_helper`, so they mean what
they mean in verl: token-level w_t = min(exp(old_t - rollout_t), C), sequence-level
w = min(exp(sum_t (old_t - rollout_t)), C), both detached and zero off the mask. Here
"old" is the trainer's logprob of the sampled token under the weights that sampled it.
"""

from __future__ import annotations

import torch
from verl.trainer.ppo import rollout_corr_helper as rch

from vlrl.rl_config import MismatchConfig


@torch.no_grad()
def mismatch_metrics(
    old_logprobs: torch.Tensor,  # (B, T) trainer logprobs of the sampled tokens
    rollout_logprobs: torch.Tensor,  # (B, T) sampler logprobs of the same tokens
    response_mask: torch.Tensor,  # (B, T)
) -> dict[str, float]:
    """How far the sampler's logprobs are from the trainer's (glossary: docs/rl-algorithms.md)."""
    m = response_mask.bool() & torch.isfinite(rollout_logprobs)  # NaN: a row nobody sampled (rlhf/guidance.py)
    if not bool(m.any()):
        return {}
    rollout_logprobs = torch.nan_to_num(rollout_logprobs.float(), nan=0.0)
    d = (old_logprobs - rollout_logprobs).float()[m]  # (N,) log(pi_train / pi_rollout) per token
    k3 = torch.exp(d.clamp(-20, 20)) - d - 1.0  # estimates KL(rollout || train) from rollout samples
    out = {
        "mismatch/abs_diff_mean": float(d.abs().mean()),
        "mismatch/abs_diff_max": float(d.abs().max()),
        "mismatch/diff_mean": float(d.mean()),
        "mismatch/k1": float((-d).mean()),
        "mismatch/k3": float(k3.mean()),
        "mismatch/prob_abs_diff_mean": float(
            (old_logprobs.float().exp() - rollout_logprobs.float().exp())[m].abs().mean()
        ),
    }
    # verl's diagnostics (perplexities, chi-square) under its own names.
    rows = m.any(-1)  # verl averages per sequence: an unsampled row must not count as an empty one
    for k, v in rch.compute_offpolicy_metrics(old_logprobs.float()[rows], rollout_logprobs[rows], m[rows].float()).items():
        out[f"rollout_corr/{k}"] = float(v)
    return out


@torch.no_grad()
def rollout_correction(
    old_logprobs: torch.Tensor,  # (B, T)
    rollout_logprobs: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    cfg: MismatchConfig,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """-> (IS weights (B, T) or None when off, response mask after rejection (B, T), metrics).

    Compute once per step on the whole batch (batch normalisation and sequence rejection
    look at all of it), then hand every mini-batch's slice of the weights and of the
    returned mask to `policy_loss` / `actor_loss`."""
    mask = response_mask.float()
    if cfg.is_level is None and cfg.rejection is None:
        return None, mask, {}
    if not bool(mask.bool().any()):
        return (torch.zeros_like(mask) if cfg.is_level else None), mask, {}
    proto, new_mask, metrics = rch.compute_rollout_correction_and_rejection_mask(
        old_log_prob=old_logprobs.float(),
        rollout_log_prob=rollout_logprobs.float(),
        response_mask=mask,
        rollout_is=cfg.is_level,
        rollout_is_threshold=cfg.is_threshold,
        rollout_is_batch_normalize=cfg.is_batch_normalize,
        rollout_rs=cfg.rejection,
        rollout_rs_threshold=cfg.rejection_threshold,
    )
    weights = proto.batch["rollout_is_weights"] if proto is not None else None
    return weights, new_mask.float(), {k: float(v) for k, v in metrics.items()}

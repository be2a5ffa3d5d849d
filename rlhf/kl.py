"""KL to the reference policy: per-token estimators, the in-loss term, and the
coefficient controllers (fixed, adaptive, GRPO-D dynamic).

Estimators are verl's `core_algos.kl_penalty`. With x = log q - log p per token
(p = policy, q = reference): k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1 (verl clamps x to
[-20, 20] and k3 to [-10, 10]). A "+" suffix keeps the value of k1/k3 but takes the
gradient of k2, which is the unbiased gradient of KL(p || q).

Where we depart from the papers:
- KL sits in the loss (GRPO, DeepSeekMath), not in the reward (PPO/InstructGPT), and is
  aggregated with the same `agg_mode` as the policy loss, as verl does.
- The coefficient is a float the RL controller carries from step to step (and saves for
  exact resume); the controllers here are pure functions of (step, previous value,
  observed KL), not objects with hidden state.
- GRPO-D (OThink-MR1) is defined on [0, t]; after the last step we hold beta_max.
"""

from __future__ import annotations

import numpy as np
import torch
from verl.trainer.ppo import core_algos

from vlrl.rl_config import AggMode, KLConfig, KLKind
from rlhf.agg import LossNorm, aggregate


def kl_penalty(
    logprobs: torch.Tensor,  # (B, T) policy log p(token)
    ref_logprobs: torch.Tensor,  # (B, T) reference log q(token)
    kind: KLKind = "k3",
) -> torch.Tensor:
    """Per-token KL estimate (B, T)."""
    return core_algos.kl_penalty(logprobs, ref_logprobs, kind)


def kl_loss(
    logprobs: torch.Tensor,  # (B, T)
    ref_logprobs: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    kind: KLKind,
    agg_mode: AggMode,
    norm: LossNorm | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """The KL term of the loss (scalar), before multiplying by the coefficient."""
    per_token = kl_penalty(logprobs, ref_logprobs, kind)  # (B, T)
    return aggregate(per_token, response_mask, agg_mode, norm, loss_scale_factor)


# --------------------------------------------------------------------------- coefficients


def initial_kl_coef(cfg: KLConfig, total_steps: int) -> float:
    """The coefficient for step 0."""
    if cfg.controller == "dynamic":
        return grpo_d_kl_coef(0, cfg.beta_min, cfg.beta_max, _warmup(cfg, total_steps), total_steps)
    return cfg.coef


def next_kl_coef(
    cfg: KLConfig,
    step: int,  # the step about to run (0-based)
    prev_coef: float,  # the coefficient used in the previous step
    observed_kl: float | None,  # mean KL measured in the previous step (adaptive only)
    n_samples: int,  # samples in the previous step (adaptive only: verl's n_steps)
    total_steps: int,
) -> float:
    """The coefficient for `step`, given what the previous step saw."""
    if cfg.controller == "fixed":
        return cfg.coef
    if cfg.controller == "dynamic":
        return grpo_d_kl_coef(step, cfg.beta_min, cfg.beta_max, _warmup(cfg, total_steps), total_steps)
    if observed_kl is None:
        return prev_coef
    return adaptive_kl_coef(prev_coef, observed_kl, n_samples, cfg.target_kl, cfg.horizon)


def adaptive_kl_coef(value: float, current_kl: float, n_steps: int, target_kl: float, horizon: int) -> float:
    """One update of verl's `AdaptiveKLController` (Ziegler et al. 2019):
    value * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)."""
    error = float(np.clip(current_kl / target_kl - 1.0, -0.2, 0.2))
    return value * (1.0 + error * n_steps / horizon)


def grpo_d_kl_coef(step: int, beta_min: float, beta_max: float, warmup_steps: int, total_steps: int) -> float:
    """GRPO-D dynamic KL (OThink-MR1): from beta_mid down to beta_min over the warm-up w,
    then linearly up to beta_max at step t; beta_mid = (beta_min + beta_max) / 2."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    mid = (beta_min + beta_max) / 2.0
    s = min(max(step, 0), total_steps)
    if warmup_steps > 0 and s <= warmup_steps:
        return mid - (mid - beta_min) * s / warmup_steps
    if total_steps == warmup_steps:
        return beta_min
    return beta_min + (beta_max - beta_min) * (s - warmup_steps) / (total_steps - warmup_steps)


def _warmup(cfg: KLConfig, total_steps: int) -> int:
    return int(round(cfg.warmup_ratio * total_steps))

"""The RL algorithm's math in one import: advantages, losses, KL, mismatch, batching.

Importing this module (or `rlhf.advantages` / `rlhf.losses`) registers our estimator
`vlrl_grpo_batch_std` and loss `vlrl_seq_mask` in verl's registries, so they also work
inside verl's own trainer. The pieces live in small modules; see docs/rl-algorithms.md.
"""

from __future__ import annotations

from rlhf.advantages import (
    advantage_metrics,
    compute_advantages,
    compute_grpo_batch_std_advantage,
    group_ids,
    has_learning_signal,
    outcome_to_token_rewards,
)
from rlhf.agg import LossNorm, aggregate
from rlhf.batching import GroupFilter, MiniBatch, fill_batch, filter_groups, mask_truncated, minibatches
from vlrl.rl_config import (
    AGG_MODES,
    ESTIMATORS,
    LOSSES,
    AdvantageConfig,
    DynamicSamplingConfig,
    EntropyConfig,
    KLConfig,
    LossConfig,
    MismatchConfig,
    RLAlgoConfig,
)
from rlhf.kl import adaptive_kl_coef, grpo_d_kl_coef, initial_kl_coef, kl_loss, kl_penalty, next_kl_coef
from rlhf.losses import (
    VlrlActorConfig,
    actor_config,
    actor_loss,
    compute_policy_loss_seq_mask,
    entropy_term,
    policy_loss,
    token_entropy,
)
from rlhf.mismatch import mismatch_metrics, rollout_correction

__all__ = [
    "AGG_MODES",
    "ESTIMATORS",
    "LOSSES",
    "AdvantageConfig",
    "DynamicSamplingConfig",
    "EntropyConfig",
    "GroupFilter",
    "KLConfig",
    "LossConfig",
    "LossNorm",
    "MiniBatch",
    "MismatchConfig",
    "RLAlgoConfig",
    "VlrlActorConfig",
    "actor_config",
    "actor_loss",
    "adaptive_kl_coef",
    "advantage_metrics",
    "aggregate",
    "compute_advantages",
    "compute_grpo_batch_std_advantage",
    "compute_policy_loss_seq_mask",
    "entropy_term",
    "fill_batch",
    "filter_groups",
    "group_ids",
    "grpo_d_kl_coef",
    "has_learning_signal",
    "initial_kl_coef",
    "kl_loss",
    "kl_penalty",
    "mask_truncated",
    "minibatches",
    "mismatch_metrics",
    "next_kl_coef",
    "outcome_to_token_rewards",
    "policy_loss",
    "rollout_correction",
    "token_entropy",
]

"""Advantages: one call for every critic-free estimator in verl's registry, plus ours.

verl's estimators take different arguments (`index`, `reward_baselines`,
`sum_pi_squared`, `config`, ...). `compute_advantages` gives them one signature: the
per-estimator extras are keyword arguments checked in one table (`_EXTRAS`), and the
arguments each function accepts are read from its signature, so a user's estimator
registered with `register_adv_est` is called the same way.

Facts about verl 0.9.1 that the tests pin down:
- GRPO divides by the *unbiased* group std (`torch.std`, n - 1), plus epsilon 1e-6.
- A group with one sample gets mean 0 and std 1: its advantage is its raw reward.
- Outcome estimators sum `token_level_rewards` over T, so the score may sit on any token;
  `outcome_to_token_rewards` puts it on the last response token.

Our estimator, `vlrl_grpo_batch_std` (where we depart from GRPO): group-mean baseline,
but the std is taken over the whole batch of centred rewards instead of per group
(the "group mean, batch std" normalisation of Liu et al. 2025, "Tricks or Traps? A Deep
Dive into RL for LLM Reasoning"). Per-group std turns tiny reward
differences into unit-size advantages: two answers scored 1.000 and 1.001 by a length
term get +-0.7, the same as a right and a wrong answer. Our hybrid rewards (length,
diversity and perception terms on top of accuracy) make such near-ties common, so the
batch std keeps advantages on one scale across prompts. Equal-reward groups still get
exactly zero, and `norm_by_std=False` gives the Dr.GRPO mean-only baseline.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo import core_algos

from vlrl.rl_config import AdvantageConfig

# Estimator -> extra inputs it cannot run without (beyond rewards, mask and group index).
_EXTRAS: dict[str, tuple[str, ...]] = {
    "remax": ("reward_baselines",),
    "optimal_token_baseline": ("old_logprobs", "sum_pi_squared"),
    "tir_optimal_token_baseline": ("old_logprobs", "sum_pi_squared"),
}


def group_ids(group_index: Any) -> np.ndarray:
    """Group labels (ints, strings, a tensor) as the 1-D numpy array verl indexes with."""
    if isinstance(group_index, torch.Tensor):
        return group_index.detach().cpu().reshape(-1).numpy()
    arr = np.asarray(list(group_index) if not isinstance(group_index, np.ndarray) else group_index)
    if arr.ndim != 1:
        raise ValueError(f"group_index must be 1-D, got shape {arr.shape}")
    return arr


def outcome_to_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sequence scores (B,) -> token rewards (B, T) with the score on the last response token.

    Build this from the mask *before* truncation masking: a row whose mask is all zero
    keeps its score (on the last column) so it still counts in its group's baseline."""
    b, t = response_mask.shape
    lengths = response_mask.long().sum(-1)  # (B,)
    last = torch.where(lengths > 0, lengths - 1, torch.full_like(lengths, t - 1))  # (B,)
    out = torch.zeros((b, t), dtype=torch.float32, device=response_mask.device)
    out[torch.arange(b, device=response_mask.device), last] = scores.to(torch.float32)
    return out


def algo_config(cfg: AdvantageConfig) -> AlgoConfig:
    """The verl `AlgoConfig` an estimator reads its settings from."""
    return AlgoConfig(
        adv_estimator=cfg.estimator,
        gamma=cfg.gamma,
        norm_adv_by_std_in_grpo=cfg.norm_by_std,
        gdpo_reward_keys=list(cfg.gdpo_components) if cfg.gdpo_components else None,
        gdpo_reward_weights=list(cfg.gdpo_weights) if cfg.gdpo_weights else None,
    )


def compute_advantages(
    token_level_rewards: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T) 1 on response tokens that carry loss
    group_index: Any,  # (B,) prompt/group id per sample
    cfg: AdvantageConfig,
    *,
    reward_baselines: torch.Tensor | None = None,  # (B,) remax: reward of the greedy answer
    reward_components: Mapping[str, Sequence[float]] | None = None,  # gdpo: name -> (B,)
    old_logprobs: torch.Tensor | None = None,  # (B, T) optimal_token_baseline
    sum_pi_squared: torch.Tensor | None = None,  # (B, T) optimal_token_baseline: sum_v pi(v)^2
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """-> (advantages (B, T), returns (B, T), metrics). Zero outside `response_mask`."""
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask {tuple(response_mask.shape)} differ")
    index = group_ids(group_index)
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"group_index has {len(index)} entries for a batch of {token_level_rewards.shape[0]}")
    given = {
        "reward_baselines": reward_baselines,
        "old_logprobs": old_logprobs,
        "sum_pi_squared": sum_pi_squared,
    }
    missing = [k for k in _EXTRAS.get(cfg.estimator, ()) if given[k] is None]
    if missing:
        raise ValueError(f"estimator {cfg.estimator!r} needs {', '.join(missing)}")

    mask = response_mask.to(torch.float32)
    rewards = token_level_rewards.to(torch.float32)
    kwargs: dict[str, Any] = {
        "token_level_rewards": rewards,
        "response_mask": mask,
        "index": index,
        "epsilon": cfg.epsilon,
        "norm_adv_by_std_in_grpo": cfg.norm_by_std,
        "config": algo_config(cfg),
    }
    if reward_baselines is not None:
        kwargs["reward_baselines"] = reward_baselines.to(torch.float32)
    if old_logprobs is not None:
        kwargs["old_log_probs"] = old_logprobs.detach().to(torch.float32)
    if sum_pi_squared is not None:
        kwargs["sum_pi_squared"] = sum_pi_squared.detach().to(torch.float32)
    if cfg.estimator == "gdpo" and cfg.gdpo_components:
        kwargs.update(_gdpo_inputs(cfg, reward_components, mask))

    fn = core_algos.get_adv_estimator_fn(cfg.estimator)
    advantages, returns = fn(**_accepted(fn, kwargs))
    advantages = advantages * mask
    return advantages, returns, advantage_metrics(advantages, mask)


def _gdpo_inputs(cfg: AdvantageConfig, components: Mapping[str, Sequence[float]] | None, mask: torch.Tensor) -> dict[str, Any]:
    """verl's gdpo reads per-component scores from a DataProto-like batch; build the
    two fields it uses (`prompts` only for its width, `attention_mask` for the length)."""
    names = list(cfg.gdpo_components or ())
    if components is None or any(n not in components for n in names):
        have = sorted(components or {})
        raise ValueError(f"gdpo needs reward_components for {names}; got {have}")
    b = mask.shape[0]
    return {
        "non_tensor_batch": {n: np.asarray(components[n], dtype=np.float32) for n in names},
        "batch": {"prompts": torch.zeros((b, 0), dtype=torch.long), "attention_mask": mask.long()},
    }


def _accepted(fn, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Only the arguments `fn` names: verl's estimators differ in what they take, and
    one that ends in **kwargs would silently swallow an input it never uses."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def advantage_metrics(advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sequence-level statistics of the advantages (glossary: docs/rl-algorithms.md)."""
    lengths = mask.sum(-1)  # (B,)
    valid = lengths > 0
    if not bool(valid.any()):
        return {"adv/mean": 0.0, "adv/std": 0.0, "adv/abs_max": 0.0, "adv/zero_frac": 1.0}
    seq = (advantages * mask).sum(-1)[valid] / lengths[valid]  # (B',) mean advantage per sequence
    return {
        "adv/mean": float(seq.mean()),
        "adv/std": float(seq.std(unbiased=False)),
        "adv/abs_max": float(seq.abs().max()),
        "adv/zero_frac": float((seq.abs() < 1e-12).float().mean()),
    }


def has_learning_signal(advantages: torch.Tensor, response_mask: torch.Tensor) -> bool:
    """False when every loss-carrying token has zero advantage: the policy gradient is
    zero, so a trainer with weight decay should skip the optimizer step rather than
    shrink the weights on no evidence."""
    return bool(((advantages * response_mask).abs() > 0).any())


# --------------------------------------------------------------------------- our estimator


def compute_grpo_batch_std_advantage(
    token_level_rewards: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    index: np.ndarray,  # (B,)
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: AlgoConfig | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - mean_{g(i)}(r)) / (std_batch(r - mean_g) + eps), broadcast over tokens.

    The batch std is the unbiased std of the centred scores over all B samples (singleton
    groups included, as in verl: mean 0 for a group of one)."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)  # (B,)
        inv = torch.as_tensor(np.unique(index, return_inverse=True)[1].reshape(-1), device=scores.device)  # (B,)
        counts = torch.bincount(inv).to(scores.dtype)  # (G,)
        sums = torch.bincount(inv, weights=scores).to(scores.dtype)  # (G,)
        mean = torch.where(counts > 1, sums / counts, torch.zeros_like(sums))  # (G,)
        centred = scores - mean[inv]  # (B,)
        if norm_adv_by_std_in_grpo and centred.numel() > 1:
            centred = centred / (centred.std() + epsilon)
        advantages = centred.unsqueeze(-1) * response_mask  # (B, T)
    return advantages, advantages


def _register() -> None:
    # verl's decorator refuses a second, different function under one name (it would if
    # this module were reloaded), so register only once.
    if core_algos.ADV_ESTIMATOR_REGISTRY.get("vlrl_grpo_batch_std") is None:
        core_algos.register_adv_est("vlrl_grpo_batch_std")(compute_grpo_batch_std_advantage)


_register()

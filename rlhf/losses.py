"""Policy losses (through verl's registry), the entropy bonus, and the whole actor loss.

`policy_loss` calls any loss registered with `core_algos.register_policy_loss` the way
verl's own `ppo_loss` does: one `ActorConfig` built from our `LossConfig`, the loss
aggregation mode, and optional rollout importance-sampling weights.

PPO-clip ("vanilla") per token, rho = exp(logp - old_logp), A = advantage:
    L = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))        clip-higher: eps_high > eps_low
    L = min(L, -c A) where A < 0                                     dual clip (Ye et al. 2020)
then aggregated with `agg_mode` (rlhf/agg.py).

Where we depart from the papers / from verl:
- GRPO's paper averages per sequence then over the group (seq-mean-token-mean); our
  default is token-mean (DAPO), since long answers otherwise get a smaller per-token
  gradient. Dr.GRPO's fixed divisor is `loss_scale_factor`, which we ask to set to the max
  response length: verl's default (the padded width) changes with each batch's padding.
- verl always applies dual clip; `dual_clip_c: null` turns it off (c = 1e9).
- KL and entropy use the loss's `agg_mode` too (as verl does); the entropy bonus is
  subtracted from the loss.

Our loss, `vlrl_seq_mask`: PPO-clip plus the off-policy sequence masking of DeepSeek-V3.2
(technical report, 2025): a sequence with negative advantage whose mean log(pi_old / pi_theta)
over its tokens exceeds `seq_mask_delta` is dropped from the loss. Negative-advantage
samples the policy has already moved far away from give large, noisy gradients; this
matters with several epochs/mini-batches per step and with stale (async) rollouts. The
mask is computed without gradient and the remaining tokens are aggregated as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import verl.utils.torch_functional as verl_F
from verl.trainer.config import RolloutCorrectionConfig
from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig, PolicyLossConfig

from rlhf.agg import LossNorm, aggregate
from vlrl.rl_config import LossConfig, MismatchConfig, RLAlgoConfig
from rlhf.kl import kl_loss
from rlhf.mismatch import mismatch_metrics, rollout_correction

NO_DUAL_CLIP = 1e9


@dataclass
class VlrlActorConfig(ActorConfig):
    """verl's ActorConfig plus the settings of our own losses; to use them inside verl's
    trainer, point the actor config's `_target_` here."""

    seq_mask_delta: float = 0.1


def actor_config(cfg: LossConfig, norm: LossNorm | None = None, mismatch: MismatchConfig | None = None) -> VlrlActorConfig:
    """The verl `ActorConfig` a registered loss reads its settings from.

    Built per call (about 50 us): `global_batch_info` differs per micro-batch, and a shared
    config mutated in place would be hidden state."""
    mm = mismatch or MismatchConfig()
    return VlrlActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=cfg.clip_ratio_low,
        clip_ratio_low=cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        clip_ratio_c=cfg.dual_clip_c if cfg.dual_clip_c is not None else NO_DUAL_CLIP,
        loss_agg_mode=cfg.agg_mode,
        loss_scale_factor=cfg.loss_scale_factor,
        tau_pos=cfg.sapo_tau_pos,
        tau_neg=cfg.sapo_tau_neg,
        policy_loss=PolicyLossConfig(
            loss_mode=cfg.name,
            clip_cov_ratio=cfg.clip_cov_ratio,
            clip_cov_lb=cfg.clip_cov_lb,
            clip_cov_ub=cfg.clip_cov_ub,
            kl_cov_ratio=cfg.kl_cov_ratio,
            ppo_kl_coef=cfg.kl_cov_coef,
            dro_beta=cfg.dro_beta,
            rollout_correction=RolloutCorrectionConfig(
                rollout_is=mm.is_level,
                rollout_is_threshold=mm.is_threshold,
                rollout_is_batch_normalize=mm.is_batch_normalize,
                rollout_rs=mm.rejection,
                rollout_rs_threshold=mm.rejection_threshold,
                bypass_mode=cfg.name == "bypass_mode",
            ),
        ),
        global_batch_info=(norm or LossNorm()).as_kwargs(cfg.loss_scale_factor),
        seq_mask_delta=cfg.seq_mask_delta,
    )


def policy_loss(
    old_logprobs: torch.Tensor,  # (B, T) logprobs under the weights that sampled (trainer side)
    logprobs: torch.Tensor,  # (B, T) current policy, with grad
    advantages: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    cfg: RLAlgoConfig,
    rollout_logprobs: torch.Tensor | None = None,  # (B, T) sampler logprobs (vLLM)
    *,
    rollout_is_weights: torch.Tensor | None = None,  # (B, T) precomputed by rollout_correction
    norm: LossNorm | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """-> (policy-gradient loss scalar, metrics).

    With `rollout_logprobs`, mismatch metrics are logged and, when `cfg.mismatch` asks for
    it, truncated IS weights / rejection are computed here from this batch alone; pass
    `rollout_is_weights` from a per-step `rollout_correction` call instead when mini-batches
    should share batch-level normalisation. `bypass_mode` computes its own weights."""
    mask, is_weights, metrics = _correct(old_logprobs, rollout_logprobs, response_mask, cfg, rollout_is_weights)
    loss, pg_metrics = _pg_loss(old_logprobs, logprobs, advantages, mask, cfg, is_weights, norm)
    return loss, {**metrics, **pg_metrics}


def _correct(
    old_logprobs: torch.Tensor,  # (B, T)
    rollout_logprobs: torch.Tensor | None,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    cfg: RLAlgoConfig,
    is_weights: torch.Tensor | None,  # (B, T)
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """-> (mask after rejection, IS weights or None, mismatch metrics)."""
    mask = response_mask.float()
    if rollout_logprobs is None:
        return mask, is_weights, {}
    metrics = mismatch_metrics(old_logprobs, rollout_logprobs, mask)
    if is_weights is None and cfg.loss.name != "bypass_mode":
        is_weights, mask, corr = rollout_correction(old_logprobs, rollout_logprobs, mask, cfg.mismatch)
        metrics.update(corr)
    return mask, is_weights, metrics


def _pg_loss(old_logprobs, logprobs, advantages, mask, cfg: RLAlgoConfig, is_weights, norm) -> tuple[torch.Tensor, dict[str, float]]:
    fn = core_algos.get_policy_loss_fn(cfg.loss.name)
    loss, pg_metrics = fn(
        old_log_prob=old_logprobs.detach(),
        log_prob=logprobs,
        advantages=advantages.detach(),
        response_mask=mask,
        loss_agg_mode=cfg.loss.agg_mode,
        config=actor_config(cfg.loss, norm, cfg.mismatch),
        rollout_is_weights=is_weights,
    )
    metrics = {k: float(v) for k, v in pg_metrics.items()}
    metrics["actor/pg_loss"] = float(loss.detach())
    return loss, metrics


def shaped_guide_loss(
    logprobs: torch.Tensor,  # (B, T) current policy, with grad
    advantages: torch.Tensor,  # (B, T)
    gamma: float,
) -> torch.Tensor:
    """LUFFY's policy shaping (Yan et al. 2025) for tokens the policy did not sample: the
    per-token loss -A f(pi) with f(pi) = pi / (pi + gamma), pi = exp(logp) -> (B, T).

    Its gradient is -A gamma pi / (pi + gamma)^2 grad log pi: largest where pi ~ gamma (a
    quarter of A there), small for tokens the policy already writes (pi ~ 1) and for ones
    it cannot yet (pi ~ 0). LUFFY shapes a ratio against pi_old = 1, whose gradient
    pi grad log pi vanishes on unlikely tokens, and shaping lifts those; against our
    unshaped reference (ratio 1: A grad log pi on every token) it only shrinks the update
    (docs/rl-stage.md measures what that costs)."""
    p = logprobs.exp()
    return -advantages.detach() * p / (p + gamma)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position: (B, T, V) -> (B, T)."""
    return verl_F.entropy_from_logits(logits.float())


def entropy_term(
    response_mask: torch.Tensor,  # (B, T)
    coef: float,
    agg_mode: str,
    *,
    entropy: torch.Tensor | None = None,  # (B, T) per-token entropies
    logits: torch.Tensor | None = None,  # (B, T, V), used when `entropy` is not given
    norm: LossNorm | None = None,
    loss_scale_factor: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """-> (-coef * aggregated entropy, to add to the loss; metrics)."""
    if entropy is None:
        if logits is None:
            raise ValueError("entropy_term needs per-token entropy or logits")
        entropy = token_entropy(logits)
    ent = aggregate(entropy, response_mask, agg_mode, norm, loss_scale_factor)
    return -coef * ent, {"actor/entropy": float(ent.detach())}


def actor_loss(
    logprobs: torch.Tensor,  # (B, T) current policy, with grad
    old_logprobs: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    cfg: RLAlgoConfig,
    *,
    kl_coef: float = 0.0,  # this step's coefficient (rlhf.kl controllers)
    ref_logprobs: torch.Tensor | None = None,  # (B, T) reference policy
    entropy: torch.Tensor | None = None,  # (B, T) per-token entropy of the current policy
    rollout_logprobs: torch.Tensor | None = None,  # (B, T)
    rollout_is_weights: torch.Tensor | None = None,  # (B, T)
    norm: LossNorm | None = None,
    anchor_rows: torch.Tensor | None = None,  # (B,) 1 on perception rows (rlhf.perception.anchor_rows)
    anchor_norm: LossNorm | None = None,  # denominators of the anchor's (perception) tokens in the mini-batch
    guide_rows: torch.Tensor | None = None,  # (B,) 1 on reference solutions that guidance added (rlhf/guidance.py)
) -> tuple[torch.Tensor, dict[str, float]]:
    """pg loss + kl_coef * KL(policy || ref) + anchor_coef * KL_perception(policy || ref)
    - entropy_coef * entropy -> (loss, metrics).

    The perception anchor (cfg.perception_anchor) is the same KL restricted to the rows of
    perception prompts and normalised over their tokens, so its size does not shrink with
    the perception share. With `cfg.guidance.shaping` and `guide_rows`, the reference rows
    leave the pg loss for LUFFY's shaped term, aggregated over the same denominators, so
    the two add up to one loss over all rows. Sequences rejected by the mismatch
    correction leave the KL, anchor and entropy terms too."""
    mask, is_weights, metrics = _correct(old_logprobs, rollout_logprobs, response_mask, cfg, rollout_is_weights)
    gamma = cfg.guidance.shaping
    shaped = gamma is not None and guide_rows is not None and bool(guide_rows.any())
    if shaped:
        norm = norm or LossNorm.of(mask)  # one set of denominators for both parts
        guide_mask = mask * guide_rows.to(mask.dtype)[:, None]  # (B, T)
        loss, pg_metrics = _pg_loss(old_logprobs, logprobs, advantages, mask - guide_mask, cfg, is_weights, norm)
        guide = aggregate(shaped_guide_loss(logprobs, advantages, gamma), guide_mask, cfg.loss.agg_mode, norm, cfg.loss.loss_scale_factor)
        loss = loss + guide
        pg_metrics["actor/guide_loss"] = float(guide.detach())
    else:
        loss, pg_metrics = _pg_loss(old_logprobs, logprobs, advantages, mask, cfg, is_weights, norm)
    metrics.update(pg_metrics)
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("a KL coefficient > 0 needs ref_logprobs")
        kl = kl_loss(logprobs, ref_logprobs.detach(), mask, cfg.kl.kind, cfg.loss.agg_mode, norm, cfg.loss.loss_scale_factor)
        loss = loss + kl_coef * kl
        metrics["actor/kl_loss"] = float(kl.detach())
    metrics["actor/kl_coef"] = float(kl_coef)
    anchor = cfg.perception_anchor
    if anchor.kl_coef > 0 and anchor_rows is not None and bool(anchor_rows.any()):
        if ref_logprobs is None:
            raise ValueError("perception_anchor.kl_coef > 0 needs ref_logprobs")
        rows_mask = mask * anchor_rows.to(mask.dtype)[:, None]  # (B, T)
        pkl = kl_loss(logprobs, ref_logprobs.detach(), rows_mask, anchor.kind, cfg.loss.agg_mode, anchor_norm, cfg.loss.loss_scale_factor)
        loss = loss + anchor.kl_coef * pkl
        metrics["actor/perception_kl"] = float(pkl.detach())
    if entropy is not None:
        ent_term, ent_metrics = entropy_term(
            mask, cfg.entropy.coef, cfg.loss.agg_mode, entropy=entropy, norm=norm, loss_scale_factor=cfg.loss.loss_scale_factor
        )
        if cfg.entropy.coef > 0:
            loss = loss + ent_term
        metrics.update(ent_metrics)
    elif cfg.entropy.coef > 0:
        raise ValueError("entropy.coef > 0 needs per-token entropy")
    metrics["actor/loss"] = float(loss.detach())
    return loss, metrics


# --------------------------------------------------------------------------- our loss


def compute_policy_loss_seq_mask(
    old_log_prob: torch.Tensor,  # (B, T)
    log_prob: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,  # (B, T)
) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO-clip with DeepSeek-V3.2 off-policy sequence masking (see the module docstring).

    Reads `seq_mask_delta` from the config when it has one (our `ActorConfig` does, a verl
    DictConfig may), else uses 0.1."""
    assert config is not None
    delta = config.get("seq_mask_delta", None)
    delta = 0.1 if delta is None else float(delta)
    mask = response_mask.to(log_prob.dtype)
    with torch.no_grad():
        n = mask.sum(-1).clamp(min=1)  # (B,)
        drift = ((old_log_prob - log_prob.detach()) * mask).sum(-1) / n  # (B,) mean log(pi_old / pi_theta)
        seq_adv = (advantages * mask).sum(-1)  # (B,) sign of the sequence advantage
        drop = (seq_adv < 0) & (drift > delta)  # (B,)
        keep = (~drop).to(mask.dtype).unsqueeze(-1)  # (B, 1)
        has_tokens = (mask.sum(-1) > 0).float()
        drop_frac = float((drop.float() * has_tokens).sum() / has_tokens.sum().clamp(min=1))
    loss, metrics = core_algos.compute_policy_loss_vanilla(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=mask * keep,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    metrics = dict(metrics)
    metrics["actor/seq_mask_frac"] = drop_frac
    return loss, metrics


core_algos.register_policy_loss("vlrl_seq_mask")(compute_policy_loss_seq_mask)

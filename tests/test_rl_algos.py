"""Advantages, policy losses, aggregation and KL against hand computations."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from verl.trainer.ppo import core_algos

from rlhf import algos as A
from vlrl.rl_config import VERL_ESTIMATORS, VERL_LOSSES, VLRL_ESTIMATORS, VLRL_LOSSES

# Two groups, interleaved so grouping must follow the ids, not the positions.
GROUPS = ["a", "b", "a", "b", "a", "b", "b"]
REWARDS = [1.0, 2.0, 0.0, 2.0, 0.5, 0.0, 4.0]
LENGTHS = [3, 5, 1, 4, 5, 2, 5]
T = 5


def _mask(lengths=LENGTHS, t=T) -> torch.Tensor:
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()  # (B, T)


def _token_rewards(rewards=REWARDS, lengths=LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    mask = _mask(lengths)
    return A.outcome_to_token_rewards(torch.tensor(rewards), mask), mask


def _by_group(values):
    out: dict[str, list[float]] = {}
    for g, v in zip(GROUPS, values):
        out.setdefault(g, []).append(v)
    return out


def _seq(adv: torch.Tensor) -> list[float]:
    return adv[:, 0].tolist()  # every sequence has >= 1 token: column 0 holds its advantage


# --------------------------------------------------------------------------- advantages


def test_outcome_rewards_sit_on_the_last_response_token():
    r, mask = _token_rewards()
    assert torch.equal(r.sum(-1), torch.tensor(REWARDS))
    for i, n in enumerate(LENGTHS):
        assert r[i, n - 1] == REWARDS[i] and (r[i, n:] == 0).all()


def test_grpo_matches_the_formula_with_unbiased_std():
    r, mask = _token_rewards()
    adv, ret, metrics = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator="grpo"))
    groups = _by_group(REWARDS)
    mean = {g: statistics.mean(v) for g, v in groups.items()}
    std = {g: statistics.stdev(v) for g, v in groups.items()}  # n - 1: what verl uses
    want = [(x - mean[g]) / (std[g] + 1e-6) for g, x in zip(GROUPS, REWARDS)]
    assert _seq(adv) == pytest.approx(want, abs=1e-6)
    # the population std would give other numbers: the test tells the two apart
    pop = [(x - mean[g]) / (statistics.pstdev(groups[g]) + 1e-6) for g, x in zip(GROUPS, REWARDS)]
    assert _seq(adv) != pytest.approx(pop, abs=1e-3)
    # broadcast over the response, zero on padding
    assert torch.equal(adv, adv[:, :1] * mask)
    assert metrics["adv/zero_frac"] == pytest.approx(3 / 7)  # b has two 2.0s at its mean; a has 0.5 at its mean


def test_grpo_vectorized_agrees_with_grpo():
    r, mask = _token_rewards()
    a1, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator="grpo"))
    a2, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator="grpo_vectorized"))
    assert torch.allclose(a1, a2, atol=1e-5)


def test_dr_grpo_drops_the_std():
    r, mask = _token_rewards()
    cfg = A.RLAlgoConfig.dr_grpo(max_response_tokens=T)
    adv, _, _ = A.compute_advantages(r, mask, GROUPS, cfg.advantage)
    mean = {g: statistics.mean(v) for g, v in _by_group(REWARDS).items()}
    assert _seq(adv) == pytest.approx([x - mean[g] for g, x in zip(GROUPS, REWARDS)], abs=1e-6)
    assert cfg.loss.agg_mode == "seq-mean-token-sum-norm" and cfg.loss.loss_scale_factor == T


def test_rloo_is_reward_minus_mean_of_the_others():
    r, mask = _token_rewards()
    for est in ("rloo", "rloo_vectorized"):
        adv, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator=est))
        want = []
        for i, (g, x) in enumerate(zip(GROUPS, REWARDS)):
            others = [REWARDS[j] for j in range(len(REWARDS)) if GROUPS[j] == g and j != i]
            want.append(x - statistics.mean(others))
        assert _seq(adv) == pytest.approx(want, abs=1e-6), est


def test_opo_uses_a_length_weighted_baseline():
    r, mask = _token_rewards()
    adv, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator="opo"))
    want = []
    for g, x in zip(GROUPS, REWARDS):
        rows = [j for j in range(len(GROUPS)) if GROUPS[j] == g]
        base = sum(LENGTHS[j] * REWARDS[j] for j in rows) / sum(LENGTHS[j] for j in rows)
        want.append(x - base)
    assert _seq(adv) == pytest.approx(want, abs=1e-6)


def test_grpo_passk_rewards_only_the_best_of_each_group():
    r, mask = _token_rewards()
    adv, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator="grpo_passk", norm_by_std=False))
    # a: best 1.0, second 0.5 -> +0.5 on row 0; b: best 4.0, second 2.0 -> +2.0 on row 6
    assert _seq(adv) == pytest.approx([0.5, 0, 0, 0, 0, 0, 2.0], abs=1e-6)


def test_reinforce_pp_baseline_whitens_group_centred_rewards_over_tokens():
    r, mask = _token_rewards()
    adv, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator="reinforce_plus_plus_baseline"))
    mean = {g: statistics.mean(v) for g, v in _by_group(REWARDS).items()}
    tok = np.concatenate([[x - mean[g]] * n for g, x, n in zip(GROUPS, REWARDS, LENGTHS)])  # token-weighted
    mu, sd = tok.mean(), tok.std(ddof=1)
    want = [(x - mean[g] - mu) / math.sqrt(sd**2 + 1e-8) for g, x in zip(GROUPS, REWARDS)]
    assert _seq(adv) == pytest.approx(want, abs=1e-5)


def test_remax_needs_and_uses_baselines():
    r, mask = _token_rewards()
    cfg = A.AdvantageConfig(estimator="remax")
    with pytest.raises(ValueError, match="reward_baselines"):
        A.compute_advantages(r, mask, GROUPS, cfg)
    base = torch.tensor([0.5] * 7)
    adv, _, _ = A.compute_advantages(r, mask, GROUPS, cfg, reward_baselines=base)
    assert _seq(adv) == pytest.approx([x - 0.5 for x in REWARDS], abs=1e-6)


def test_gdpo_normalises_each_component_then_whitens():
    r, mask = _token_rewards()
    comps = {"acc": [1, 0, 0, 1, 1, 0, 1], "fmt": [1, 1, 0, 0, 1, 1, 0]}
    cfg = A.AdvantageConfig(estimator="gdpo", gdpo_components=["acc", "fmt"], gdpo_weights=[1.0, 0.5])
    adv, _, _ = A.compute_advantages(r, mask, GROUPS, cfg, reward_components=comps)

    def grpo(vals):
        g = _by_group(vals)
        return np.array([(v - statistics.mean(g[k])) / (statistics.stdev(g[k]) + 1e-6) for k, v in zip(GROUPS, vals)])

    s = 1.0 * grpo(comps["acc"]) + 0.5 * grpo(comps["fmt"])
    tok = np.concatenate([[x] * n for x, n in zip(s, LENGTHS)])
    want = (s - tok.mean()) / math.sqrt(tok.var(ddof=1) + 1e-8)
    assert _seq(adv) == pytest.approx(want.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="reward_components"):
        A.compute_advantages(r, mask, GROUPS, cfg)


def test_our_batch_std_estimator():
    r, mask = _token_rewards()
    adv, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator="vlrl_grpo_batch_std"))
    mean = {g: statistics.mean(v) for g, v in _by_group(REWARDS).items()}
    centred = [x - mean[g] for g, x in zip(GROUPS, REWARDS)]
    sd = statistics.stdev(centred)
    assert _seq(adv) == pytest.approx([c / (sd + 1e-6) for c in centred], abs=1e-6)
    # mean-only when asked (Dr.GRPO style)
    adv2, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig(estimator="vlrl_grpo_batch_std", norm_by_std=False))
    assert _seq(adv2) == pytest.approx(centred, abs=1e-6)
    # the point of it: a near-tie is not blown up to unit size as per-group std does
    near = [1.0, 0.0, 1.001, 1.0, 0.5, 0.0, 1.0]
    rn, _ = _token_rewards(near)
    per_group, _, _ = A.compute_advantages(rn, mask, ["x", "y", "x", "y", "y", "z", "z"], A.AdvantageConfig(estimator="grpo"))
    batch, _, _ = A.compute_advantages(rn, mask, ["x", "y", "x", "y", "y", "z", "z"], A.AdvantageConfig(estimator="vlrl_grpo_batch_std"))
    assert abs(per_group[0, 0]) > 0.7 and abs(batch[0, 0]) < 0.01


def test_our_estimator_and_loss_are_reachable_from_verls_getters():
    assert core_algos.get_adv_estimator_fn("vlrl_grpo_batch_std") is A.compute_grpo_batch_std_advantage
    assert core_algos.get_policy_loss_fn("vlrl_seq_mask") is A.compute_policy_loss_seq_mask
    # and they run with verl's own config types (no vlrl-specific fields)
    from verl.trainer.config import AlgoConfig
    from verl.workers.config import ActorConfig

    r, mask = _token_rewards()
    fn = core_algos.get_adv_estimator_fn("vlrl_grpo_batch_std")
    adv, _ = fn(token_level_rewards=r, response_mask=mask, index=np.array(GROUPS), config=AlgoConfig())
    assert adv.shape == r.shape and torch.count_nonzero(adv) > 0
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1)
    logp = torch.full(mask.shape, -1.0, requires_grad=True)
    loss, metrics = core_algos.get_policy_loss_fn("vlrl_seq_mask")(torch.full(mask.shape, -1.0), logp, adv, mask, "token-mean", cfg)
    loss.backward()
    assert logp.grad is not None and "actor/seq_mask_frac" in metrics


def test_static_name_lists_match_verls_registries():
    verl_est = {n for n, f in core_algos.ADV_ESTIMATOR_REGISTRY.items() if f.__module__.startswith("verl.")}
    verl_loss = {n for n, f in core_algos.POLICY_LOSS_REGISTRY.items() if f.__module__.startswith("verl.")}
    assert set(VERL_ESTIMATORS) == verl_est - {"gae"}
    assert set(VERL_LOSSES) == verl_loss
    assert set(VLRL_ESTIMATORS) <= set(core_algos.ADV_ESTIMATOR_REGISTRY)
    assert set(VLRL_LOSSES) <= set(core_algos.POLICY_LOSS_REGISTRY)


@pytest.mark.parametrize("estimator", [e for e in A.ESTIMATORS])
def test_every_estimator_runs_and_masks(estimator):
    r, mask = _token_rewards()
    b = mask.shape[0]
    cfg = A.AdvantageConfig(estimator=estimator, gdpo_components=["acc"] if estimator == "gdpo" else None)
    adv, ret, metrics = A.compute_advantages(
        r,
        mask,
        GROUPS,
        cfg,
        reward_baselines=torch.zeros(b),
        reward_components={"acc": REWARDS},
        old_logprobs=torch.full(mask.shape, -1.0),
        sum_pi_squared=torch.full(mask.shape, 0.3),
    )
    assert adv.shape == mask.shape and ret.shape == mask.shape
    assert torch.isfinite(adv).all() and (adv[mask == 0] == 0).all()
    assert set(metrics) == {"adv/mean", "adv/std", "adv/abs_max", "adv/zero_frac"}


def test_group_index_may_be_a_tensor_or_ints():
    r, mask = _token_rewards()
    ids = torch.tensor([0 if g == "a" else 1 for g in GROUPS])
    a1, _, _ = A.compute_advantages(r, mask, GROUPS, A.AdvantageConfig())
    a2, _, _ = A.compute_advantages(r, mask, ids, A.AdvantageConfig())
    assert torch.equal(a1, a2)
    with pytest.raises(ValueError, match="group_index has 3 entries"):
        A.compute_advantages(r, mask, ["a", "b", "c"], A.AdvantageConfig())


# --------------------------------------------------------------------------- aggregation

LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # row 2 fully masked


@pytest.mark.parametrize(
    "mode,want",
    [
        ("token-mean", (1 + 2 + 3 + 5) / 4),
        ("token-sum", 1 + 2 + 3 + 5),
        ("seq-mean-token-sum", ((1 + 2 + 3) + 5) / 2),
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 5 / 1) / 2),
        ("seq-mean-token-sum-norm", ((1 + 2 + 3) + 5) / 2 / 4),  # default divisor: padded width T = 4
    ],
)
def test_aggregation_modes_by_hand(mode, want):
    assert float(A.aggregate(LOSS_MAT, AGG_MASK, mode)) == pytest.approx(want)


def test_dr_grpo_divisor_is_the_fixed_loss_scale_factor():
    assert float(A.aggregate(LOSS_MAT, AGG_MASK, "seq-mean-token-sum-norm", loss_scale_factor=10)) == pytest.approx(11 / 2 / 10)


@pytest.mark.parametrize("mode", A.AGG_MODES)
def test_micro_batches_with_global_norm_add_up_to_the_batch(mode):
    g = torch.Generator().manual_seed(0)
    mat = torch.randn(6, 5, generator=g)
    mask = _mask([5, 1, 3, 0, 4, 2])
    whole = A.aggregate(mat, mask, mode, loss_scale_factor=5)
    norm = A.LossNorm.of(mask)
    parts = A.aggregate(mat[:2], mask[:2], mode, norm, 5) + A.aggregate(mat[2:], mask[2:], mode, norm, 5)
    assert float(parts) == pytest.approx(float(whole), abs=1e-6)


# --------------------------------------------------------------------------- policy losses


def _ppo_case():
    # (ratio, advantage) per token of one sequence; hand loss per token with eps_low=0.2,
    # eps_high=0.28, dual clip c=3:
    cases = [
        (1.5, 1.0, -1.28),  # A>0, ratio above 1+eps_high: clipped to 1.28
        (0.5, 1.0, -0.5),  # A>0, ratio below 1-eps_low: pessimistic min keeps 0.5
        (0.5, -1.0, 0.8),  # A<0, ratio below 1-eps_low: clipped to 0.8
        (1.5, -1.0, 1.5),  # A<0, ratio above: unclipped 1.5
        (1.1, 2.0, -2.2),  # inside the trust region
        (5.0, -1.0, 3.0),  # A<0, huge ratio: dual clip caps the loss at c*|A| = 3
    ]
    ratio = torch.tensor([[c[0] for c in cases]])
    adv = torch.tensor([[c[1] for c in cases]])
    want = torch.tensor([[c[2] for c in cases]])
    old = torch.full_like(ratio, -2.0)
    return old, old + ratio.log(), adv, want


def test_ppo_clip_higher_and_dual_clip_by_hand():
    old, logp, adv, want = _ppo_case()
    logp = logp.clone().requires_grad_(True)
    cfg = A.RLAlgoConfig(loss=A.LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, dual_clip_c=3.0))
    mask = torch.ones_like(adv)
    loss, m = A.policy_loss(old, logp, adv, mask, cfg)
    assert float(loss.detach()) == pytest.approx(float(want.mean()), abs=1e-5)
    assert m["actor/pg_clipfrac"] == pytest.approx(2 / 6)  # tokens 0 and 2: the clipped term wins
    assert m["actor/pg_clipfrac_lower"] == pytest.approx(1 / 6)  # token 5: the dual clip wins
    loss.backward()
    grad = logp.grad[0]  # d loss / d logp = -A * ratio / n where unclipped, 0 where clipped
    assert grad[0] == 0 and grad[2] == 0 and grad[5] == 0
    assert float(grad[1]) == pytest.approx(-1.0 * 0.5 / 6, abs=1e-6)
    assert float(grad[3]) == pytest.approx(1.0 * 1.5 / 6, abs=1e-6)


def test_dual_clip_can_be_turned_off():
    old, logp, adv, _ = _ppo_case()
    cfg = A.RLAlgoConfig(loss=A.LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, dual_clip_c=None))
    loss, _ = A.policy_loss(old, logp, adv, torch.ones_like(adv), cfg)
    want = torch.tensor([-1.28, -0.5, 0.8, 1.5, -2.2, 5.0]).mean()
    assert float(loss) == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("mode", A.AGG_MODES)
def test_policy_loss_aggregates_per_mode(mode):
    g = torch.Generator().manual_seed(1)
    mask = _mask([4, 2, 3], t=4)
    old = -torch.rand(3, 4, generator=g) - 0.5
    logp = old + 0.05 * torch.randn(3, 4, generator=g)  # inside the clip range everywhere
    adv = torch.tensor([[1.0], [-0.5], [2.0]]).expand(3, 4)
    cfg = A.RLAlgoConfig(loss=A.LossConfig(agg_mode=mode, loss_scale_factor=8))
    loss, _ = A.policy_loss(old, logp, adv, mask, cfg)
    per_token = -adv * torch.exp(logp - old)
    rows = [(per_token[i] * mask[i]).sum().item() for i in range(3)]
    n = mask.sum(-1).tolist()
    want = {
        "token-mean": sum(rows) / sum(n),
        "token-sum": sum(rows),
        "seq-mean-token-sum": sum(rows) / 3,
        "seq-mean-token-mean": sum(r / k for r, k in zip(rows, n)) / 3,
        "seq-mean-token-sum-norm": sum(rows) / 3 / 8,
    }[mode]
    assert float(loss) == pytest.approx(want, abs=1e-5)


def test_gspo_uses_one_ratio_per_sequence():
    mask = _mask([3, 2], t=3)
    old = torch.full((2, 3), -1.0)
    logp = old + torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.6, 9.0]])  # row 1's last token is padding
    adv = torch.tensor([[1.0], [-1.0]]).expand(2, 3)
    cfg = A.RLAlgoConfig(loss=A.LossConfig(name="gspo", clip_ratio_low=0.5, clip_ratio_high=0.5, agg_mode="seq-mean-token-mean"))
    loss, _ = A.policy_loss(old, logp, adv, mask, cfg)
    s0, s1 = math.exp(0.2), math.exp(-0.3)  # geometric mean of token ratios over the real tokens
    assert float(loss) == pytest.approx((-1.0 * s0 + 1.0 * s1) / 2, abs=1e-5)


def test_our_seq_mask_loss_drops_stale_negative_sequences():
    mask = torch.ones(3, 2)
    old = torch.full((3, 2), -1.0)
    logp = torch.tensor([[-1.5, -1.5], [-1.5, -1.5], [-1.05, -1.05]])  # rows 0, 1 drifted by 0.5 > delta
    adv = torch.tensor([[-1.0], [1.0], [-1.0]]).expand(3, 2)
    cfg = A.RLAlgoConfig(loss=A.LossConfig(name="vlrl_seq_mask", seq_mask_delta=0.1, clip_ratio_low=0.6, clip_ratio_high=0.6))
    lp = logp.clone().requires_grad_(True)
    loss, m = A.policy_loss(old, lp, adv, mask, cfg)
    # row 0 dropped (A<0 and drift 0.5); row 1 kept (A>0); row 2 kept (drift 0.05)
    r1, r2 = math.exp(-0.5), math.exp(-0.05)
    assert float(loss.detach()) == pytest.approx((2 * (-1.0 * r1) + 2 * (1.0 * r2)) / 4, abs=1e-5)
    assert m["actor/seq_mask_frac"] == pytest.approx(1 / 3)
    loss.backward()
    assert (lp.grad[0] == 0).all() and (lp.grad[1] != 0).all()


@pytest.mark.parametrize("name", A.LOSSES)
def test_every_registered_loss_runs_with_our_config(name):
    g = torch.Generator().manual_seed(2)
    mask = _mask([4, 2, 3, 1], t=4)
    old = -torch.rand(4, 4, generator=g) - 0.5
    logp = (old + 0.1 * torch.randn(4, 4, generator=g)).requires_grad_(True)
    adv = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]).expand(4, 4) * mask
    cfg = A.RLAlgoConfig(loss=A.LossConfig(name=name, dro_beta=0.1 if name == "dro" else None))
    loss, metrics = A.policy_loss(old, logp, adv, mask, cfg, rollout_logprobs=old + 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad.abs().sum() > 0
    assert metrics["actor/pg_loss"] == pytest.approx(float(loss.detach()))
    assert "mismatch/abs_diff_mean" in metrics


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    x = ref - logp  # log q - log p
    assert torch.allclose(A.kl_penalty(logp, ref, "k1"), -x)
    assert torch.allclose(A.kl_penalty(logp, ref, "k2"), x**2 / 2)
    assert torch.allclose(A.kl_penalty(logp, ref, "k3"), torch.exp(x) - x - 1)
    assert torch.allclose(A.kl_penalty(logp, ref, "low_var_kl"), torch.exp(x) - x - 1)
    assert (A.kl_penalty(logp, ref, "k3") >= 0).all()


def test_k3_plus_keeps_the_value_and_takes_k2s_gradient():
    ref = torch.tensor([[-1.5, -1.0]])
    a = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    b = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    v = A.kl_penalty(a, ref, "k3+")
    assert torch.allclose(v, A.kl_penalty(a.detach(), ref, "k3"))
    v.sum().backward()
    A.kl_penalty(b, ref, "k2").sum().backward()
    assert torch.allclose(a.grad, b.grad)


def test_kl_term_in_the_actor_loss_uses_the_agg_mode_and_coefficient():
    mask = _mask([2, 1], t=2)
    old = torch.full((2, 2), -1.0)
    logp = torch.full((2, 2), -1.0)
    ref = torch.tensor([[-1.2, -0.7], [-1.1, -5.0]])
    adv = torch.zeros(2, 2)
    cfg = A.RLAlgoConfig(kl=A.KLConfig(kind="k1", coef=0.5), loss=A.LossConfig(agg_mode="seq-mean-token-mean"))
    loss, m = A.actor_loss(logp, old, adv, mask, cfg, kl_coef=0.5, ref_logprobs=ref)
    k1 = logp - ref
    want_kl = ((k1[0, 0] + k1[0, 1]) / 2 + k1[1, 0]) / 2
    assert m["actor/kl_loss"] == pytest.approx(float(want_kl))
    assert float(loss) == pytest.approx(0.5 * float(want_kl))
    with pytest.raises(ValueError, match="ref_logprobs"):
        A.actor_loss(logp, old, adv, mask, cfg, kl_coef=0.5)


def test_grpo_d_schedule_points():
    lo, hi, w, t = 0.01, 0.05, 30, 100
    assert A.grpo_d_kl_coef(0, lo, hi, w, t) == pytest.approx((lo + hi) / 2)
    assert A.grpo_d_kl_coef(w, lo, hi, w, t) == pytest.approx(lo)
    assert A.grpo_d_kl_coef(15, lo, hi, w, t) == pytest.approx(0.02)
    assert A.grpo_d_kl_coef(65, lo, hi, w, t) == pytest.approx(0.03)
    assert A.grpo_d_kl_coef(t, lo, hi, w, t) == pytest.approx(hi)
    assert A.grpo_d_kl_coef(t + 50, lo, hi, w, t) == pytest.approx(hi)
    cfg = A.KLConfig(controller="dynamic", beta_min=lo, beta_max=hi, warmup_ratio=0.3)
    assert A.initial_kl_coef(cfg, t) == pytest.approx(0.03)
    assert A.next_kl_coef(cfg, w, prev_coef=123.0, observed_kl=None, n_samples=0, total_steps=t) == pytest.approx(lo)


def test_adaptive_controller_matches_verl():
    ctl = core_algos.AdaptiveKLController(init_kl_coef=0.1, target_kl=0.05, horizon=1000)
    cfg = A.KLConfig(controller="adaptive", coef=0.1, target_kl=0.05, horizon=1000)
    value = A.initial_kl_coef(cfg, total_steps=10)
    for step, kl in enumerate([0.2, 0.06, 0.01, 0.05, 0.0]):
        ctl.update(kl, n_steps=64)
        value = A.next_kl_coef(cfg, step + 1, value, kl, 64, total_steps=10)
        assert value == pytest.approx(ctl.value, rel=1e-12)
    # by hand, first update: error clipped to +0.2
    assert A.adaptive_kl_coef(0.1, 0.2, 64, 0.05, 1000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 1000))
    assert A.next_kl_coef(cfg, 3, 0.07, None, 64, 10) == 0.07  # nothing observed: unchanged


def test_fixed_controller_and_enabled_flag():
    cfg = A.KLConfig(coef=0.02)
    assert A.next_kl_coef(cfg, 5, 0.9, 1.0, 64, 10) == 0.02 and cfg.enabled
    assert not A.KLConfig().enabled
    assert A.KLConfig(controller="dynamic", beta_max=0.1).enabled


# --------------------------------------------------------------------------- entropy


def test_entropy_bonus_from_logits_and_from_entropies():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=g)
    mask = _mask([3, 1], t=3)
    p = logits.softmax(-1)
    ent = -(p * p.log()).sum(-1)  # (B, T)
    assert torch.allclose(A.token_entropy(logits), ent, atol=1e-5)
    term, m = A.entropy_term(mask, 0.01, "token-mean", logits=logits)
    want = float((ent * mask).sum() / mask.sum())
    assert m["actor/entropy"] == pytest.approx(want, abs=1e-5)
    assert float(term) == pytest.approx(-0.01 * want, abs=1e-7)
    term2, _ = A.entropy_term(mask, 0.01, "token-mean", entropy=ent)
    assert float(term2) == pytest.approx(float(term), abs=1e-7)


def test_actor_loss_subtracts_the_entropy_bonus():
    mask = torch.ones(1, 2)
    lp = torch.tensor([[-1.0, -1.0]])
    ent = torch.tensor([[2.0, 4.0]])
    cfg = A.RLAlgoConfig(entropy=A.EntropyConfig(coef=0.1))
    loss, m = A.actor_loss(lp, lp, torch.zeros(1, 2), mask, cfg, entropy=ent)
    assert float(loss) == pytest.approx(-0.1 * 3.0) and m["actor/entropy"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="entropy"):
        A.actor_loss(lp, lp, torch.zeros(1, 2), mask, cfg)

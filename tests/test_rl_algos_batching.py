"""Dynamic sampling, truncation masking, mini-batches, mismatch metrics / TIS, config."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rlhf import algos as A

# --------------------------------------------------------------------------- dynamic sampling


def test_filter_groups_drops_groups_with_equal_rewards():
    ids = ["p", "p", "q", "q", "q", "r", "s", "s"]
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 0.3, 0.5, 0.5]
    f = A.filter_groups(ids, rewards)
    assert f.kept_groups == ["q", "r"]  # r: a single sample is kept (no spread to judge), as in verl
    assert f.dropped_groups == ["p", "s"]
    assert f.keep.tolist() == [False, False, True, True, True, True, False, False]
    assert f.metrics == {"sampling/kept_groups": 2.0, "sampling/dropped_groups": 2.0, "sampling/kept_group_frac": 0.5}


def test_filter_groups_tolerance_counts_near_ties_as_equal():
    f = A.filter_groups(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0005, 0.0, 1.0]), tolerance=1e-3)
    assert f.kept_groups == [1] and f.dropped_groups == [0]
    with pytest.raises(ValueError, match="3 group ids for 2 rewards"):
        A.filter_groups([0, 0, 1], [1.0, 2.0])


def test_fill_batch_accumulates_until_full_and_trims():
    batch, full = A.fill_batch([], ["g1", "g2"], target_groups=4)
    assert batch == ["g1", "g2"] and not full
    batch, full = A.fill_batch(batch, ["g3", "g4", "g5"], target_groups=4)
    assert batch == ["g1", "g2", "g3", "g4"] and full


# --------------------------------------------------------------------------- truncation


def test_mask_truncated_zeroes_only_length_stops():
    mask = torch.ones(4, 3)
    out, m = A.mask_truncated(mask, ["stop", "length", "error", "length"])
    assert out.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert m["batch/truncated_frac"] == 0.5
    kept, m2 = A.mask_truncated(mask, ["stop", "length", "error", "length"], enabled=False)
    assert torch.equal(kept, mask) and m2["batch/truncated_frac"] == 0.5


def test_truncated_rows_get_no_gradient_but_keep_their_reward_in_the_group():
    mask = torch.ones(4, 3)
    rewards = A.outcome_to_token_rewards(torch.tensor([1.0, 0.0, 0.0, 0.0]), mask)  # built before masking
    cfg = A.RLAlgoConfig.dapo()
    masked, _ = A.mask_truncated(mask, ["length", "stop", "stop", "stop"], cfg.mask_truncated)
    adv, _, _ = A.compute_advantages(rewards, masked, [0, 0, 0, 0], cfg.advantage)
    # the truncated winner still raised the group mean: the others are pushed down
    assert (adv[1:] < 0).all() and (adv[0] == 0).all()
    logp = torch.full((4, 3), -1.0, requires_grad=True)
    loss, _ = A.policy_loss(logp.detach(), logp, adv, masked, cfg)
    loss.backward()
    assert (logp.grad[0] == 0).all() and (logp.grad[1:] != 0).all()


# --------------------------------------------------------------------------- mini-batches


def test_minibatches_cover_every_row_once_per_epoch_deterministically():
    mbs = list(A.minibatches(10, 4, epochs=3, seed=7, step=2))
    assert [(m.epoch, m.index, len(m.indices)) for m in mbs] == [(e, k, n) for e in range(3) for k, n in enumerate([4, 4, 2])]
    for e in range(3):
        rows = torch.cat([m.indices for m in mbs if m.epoch == e])
        assert sorted(rows.tolist()) == list(range(10))
    again = list(A.minibatches(10, 4, epochs=3, seed=7, step=2))
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(mbs, again))
    other_step = list(A.minibatches(10, 4, epochs=3, seed=7, step=3))
    assert any(not torch.equal(a.indices, b.indices) for a, b in zip(mbs, other_step))
    epochs_differ = [torch.cat([m.indices for m in mbs if m.epoch == e]).tolist() for e in range(3)]
    assert epochs_differ[0] != epochs_differ[1]


def test_minibatches_without_shuffle_or_size():
    assert [sorted(m.indices.tolist()) for m in A.minibatches(5, None)] == [[0, 1, 2, 3, 4]]
    assert [m.indices.tolist() for m in A.minibatches(5, 2, shuffle=False)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        list(A.minibatches(0, 2))


# --------------------------------------------------------------------------- mismatch


def test_mismatch_metrics_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.3]])
    roll = torch.tensor([[-1.1, -1.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: ignored
    m = A.mismatch_metrics(old, roll, mask)
    d = [0.1, -0.5]  # log(pi_train / pi_rollout)
    assert m["mismatch/abs_diff_mean"] == pytest.approx(0.3)
    assert m["mismatch/abs_diff_max"] == pytest.approx(0.5)
    assert m["mismatch/k1"] == pytest.approx(0.2)
    assert m["mismatch/k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 2)
    assert m["mismatch/prob_abs_diff_mean"] == pytest.approx(
        (abs(math.exp(-1.0) - math.exp(-1.1)) + abs(math.exp(-2.0) - math.exp(-1.5))) / 2
    )
    assert m["rollout_corr/k3_kl"] == pytest.approx(m["mismatch/k3"], abs=1e-6)  # verl agrees
    assert A.mismatch_metrics(old, old, mask)["mismatch/abs_diff_max"] == 0.0


def test_truncated_is_weights_token_and_sequence():
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    roll = torch.tensor([[-1.1, -1.5], [-1.3, -1.2]])
    mask = torch.ones(2, 2)
    w, new_mask, m = A.rollout_correction(old, roll, mask, A.MismatchConfig(is_level="token", is_threshold=1.05))
    want = torch.tensor([[min(math.exp(0.1), 1.05), math.exp(-0.5)], [min(math.exp(0.3), 1.05), min(math.exp(0.2), 1.05)]])
    assert torch.allclose(w, want, atol=1e-6) and torch.equal(new_mask, mask)
    assert not w.requires_grad
    ws, _, _ = A.rollout_correction(old, roll, mask, A.MismatchConfig(is_level="sequence", is_threshold=10.0))
    assert torch.allclose(ws, torch.tensor([[math.exp(-0.4)] * 2, [math.exp(0.5)] * 2]), atol=1e-6)
    off, _, metrics = A.rollout_correction(old, roll, mask, A.MismatchConfig())
    assert off is None and metrics == {}


def test_tis_weights_scale_the_policy_loss():
    old = torch.tensor([[-1.0, -2.0]])
    roll = torch.tensor([[-1.1, -1.5]])
    logp = old.clone()  # ratio 1: per-token loss is -A
    adv = torch.tensor([[1.0, 2.0]])
    mask = torch.ones(1, 2)
    cfg = A.RLAlgoConfig(mismatch=A.MismatchConfig(is_level="token", is_threshold=1.05))
    loss, m = A.policy_loss(old, logp, adv, mask, cfg, rollout_logprobs=roll)
    w = [min(math.exp(0.1), 1.05), math.exp(-0.5)]
    assert float(loss) == pytest.approx(-(1.0 * w[0] + 2.0 * w[1]) / 2, abs=1e-6)
    assert m["mismatch/abs_diff_max"] == pytest.approx(0.5)
    plain, m2 = A.policy_loss(old, logp, adv, mask, A.RLAlgoConfig(), rollout_logprobs=roll)
    assert float(plain) == pytest.approx(-1.5) and "mismatch/k3" in m2  # metrics only, no correction


def test_sequence_rejection_masks_far_off_sequences():
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    roll = torch.tensor([[-1.0, -1.01], [-3.0, -3.0]])  # row 1 is far from the trainer
    cfg = A.MismatchConfig(rejection="seq_mean_k3", rejection_threshold=0.5)
    w, new_mask, m = A.rollout_correction(old, roll, torch.ones(2, 2), cfg)
    assert w is None and new_mask.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert any("rollout_rs" in k for k in m)


def test_rejected_sequences_leave_every_term_of_the_actor_loss():
    old = torch.full((2, 2), -1.0)
    roll = torch.tensor([[-1.0, -1.01], [-3.0, -3.0]])  # row 1 is rejected
    logp = old.clone().requires_grad_(True)
    ref = torch.full((2, 2), -2.0)
    cfg = A.RLAlgoConfig(mismatch=A.MismatchConfig(rejection="seq_mean_k3", rejection_threshold=0.5), entropy=A.EntropyConfig(coef=0.1))
    ent = torch.ones(2, 2, requires_grad=True)
    loss, m = A.actor_loss(logp, old, torch.ones(2, 2), torch.ones(2, 2), cfg, kl_coef=0.5, ref_logprobs=ref, entropy=ent, rollout_logprobs=roll)
    loss.backward()
    assert (logp.grad[1] == 0).all() and (logp.grad[0] != 0).all()
    assert (ent.grad[1] == 0).all() and (ent.grad[0] != 0).all()
    assert m["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- config


def test_config_rejects_unknown_and_critic_estimators_with_a_clear_message():
    with pytest.raises(ValidationError, match="needs a critic"):
        A.AdvantageConfig(estimator="gae")
    with pytest.raises(ValidationError, match="unknown advantage estimator 'grop'"):
        A.AdvantageConfig(estimator="grop")
    with pytest.raises(ValidationError, match="unknown policy loss"):
        A.LossConfig(name="ppo")
    with pytest.raises(ValidationError, match="dro_beta"):
        A.LossConfig(name="dro")
    with pytest.raises(ValidationError, match="beta_min"):
        A.KLConfig(controller="dynamic", beta_min=0.2, beta_max=0.1)
    with pytest.raises(ValidationError):
        A.RLAlgoConfig.model_validate({"loss": {"agg_mode": "mean"}})
    with pytest.raises(ValidationError):
        A.RLAlgoConfig.model_validate({"epochs": 1, "typo_key": 3})


def test_presets_spell_out_the_papers():
    dapo = A.RLAlgoConfig.dapo()
    assert (dapo.loss.clip_ratio_low, dapo.loss.clip_ratio_high, dapo.loss.agg_mode) == (0.2, 0.28, "token-mean")
    assert dapo.dynamic_sampling.enabled and dapo.mask_truncated and not dapo.kl.enabled
    dr = A.RLAlgoConfig.dr_grpo(512, loss={"clip_ratio_high": 0.3})
    assert not dr.advantage.norm_by_std and dr.loss.loss_scale_factor == 512 and dr.loss.clip_ratio_high == 0.3
    assert dr.loss.agg_mode == "seq-mean-token-sum-norm"


def test_config_module_imports_without_torch_or_verl():
    import subprocess
    import sys

    code = "import sys, vlrl.rl_config; print('torch' in sys.modules, 'verl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_metric_we_emit_is_in_the_glossary():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "rl-algorithms.md").read_text()
    b, t = 4, 4
    mask = torch.ones(b, t)
    old = torch.full((b, t), -1.0)
    logp = (old + 0.05 * torch.linspace(-1, 1, b * t).reshape(b, t)).requires_grad_(True)
    adv = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]).expand(b, t)
    keys: set[str] = set()
    for name in A.LOSSES:
        cfg = A.RLAlgoConfig(
            loss=A.LossConfig(name=name, dro_beta=0.1 if name == "dro" else None),
            mismatch=A.MismatchConfig(is_level="token", rejection="seq_mean_k3", rejection_threshold=0.5),
            entropy=A.EntropyConfig(coef=0.01),
        )
        _, m = A.actor_loss(logp, old, adv, mask, cfg, kl_coef=0.1, ref_logprobs=old, entropy=torch.ones(b, t), rollout_logprobs=old + 0.01)
        keys |= set(m)
    keys |= set(A.compute_advantages(A.outcome_to_token_rewards(torch.rand(b), mask), mask, [0, 0, 1, 1], A.AdvantageConfig())[2])
    keys |= set(A.filter_groups([0, 0, 1, 1], [1, 1, 0, 1]).metrics)
    keys |= set(A.mask_truncated(mask, ["stop"] * b)[1])
    ours = {k for k in keys if not k.startswith("rollout_corr/")}
    assert len(ours) > 20
    missing = sorted(k for k in ours if f"`{k}`" not in doc)
    assert missing == []
    assert "`rollout_corr/*`" in doc


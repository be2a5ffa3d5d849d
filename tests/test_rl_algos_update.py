"""Whole RL updates on a tiny torch policy: equal rewards change nothing; rewards teach."""

from __future__ import annotations

import pytest
import torch

from rlhf import algos as A

VOCAB, PROMPT, T = 11, 3, 4


class TinyPolicy(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> logits (B, L, V)
        return self.head(torch.tanh(self.emb(ids).cumsum(dim=1)))


def response_logprobs(model: TinyPolicy, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logprobs (B, T) of the response tokens, their entropies (B, T))."""
    logits = model(ids)[:, PROMPT - 1 : -1]  # (B, T, V): position t predicts token t + 1
    logp = logits.log_softmax(-1).gather(-1, ids[:, PROMPT:, None]).squeeze(-1)
    return logp, A.token_entropy(logits)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (8, PROMPT + T), generator=g)  # 2 prompts x 4 samples
    ids[:4, :PROMPT] = ids[0, :PROMPT]
    ids[4:, :PROMPT] = ids[4, :PROMPT]
    mask = (torch.arange(T)[None, :] < torch.tensor([4, 2, 3, 4, 1, 4, 2, 3])[:, None]).float()
    return ids, mask, ["p0"] * 4 + ["p1"] * 4


def rl_step(model, opt, ids, mask, groups, rewards, cfg, *, ref=None, kl_coef=0.0, step=0):
    """One RL step as the controller will run it: advantages once, then epochs x mini-batches."""
    with torch.no_grad():
        old, _ = response_logprobs(model, ids)
        ref_lp = response_logprobs(ref, ids)[0] if ref is not None else None
    token_rewards = A.outcome_to_token_rewards(torch.tensor(rewards), mask)
    adv, _, _ = A.compute_advantages(token_rewards, mask, groups, cfg.advantage)
    grads_seen = []
    for mb in A.minibatches(len(groups), cfg.mini_batch_size, cfg.epochs, seed=cfg.seed, step=step, shuffle=cfg.shuffle):
        i = mb.indices
        logp, ent = response_logprobs(model, ids[i])
        loss, _ = A.actor_loss(
            logp,
            old[i],
            adv[i],
            mask[i],
            cfg,
            kl_coef=kl_coef,
            ref_logprobs=ref_lp[i] if ref_lp is not None else None,
            entropy=ent,
            norm=A.LossNorm.of(mask[i]),
        )
        opt.zero_grad(set_to_none=False)
        loss.backward()
        grads_seen.append(max(float(p.grad.abs().max()) for p in model.parameters()))
        opt.step()
    return adv, grads_seen


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


EQUAL = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # every group has equal rewards


@pytest.mark.parametrize(
    "estimator,norm_by_std,loss",
    [(e, True, "vanilla") for e in ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg", "grpo_passk", "reinforce_plus_plus_baseline", "vlrl_grpo_batch_std")]
    + [("grpo", False, "vanilla")]  # Dr.GRPO
    + [("grpo", True, loss) for loss in ("gspo", "sapo", "cispo", "geo_mean", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "gpg", "dro", "vlrl_seq_mask")],
)
def test_a_step_whose_groups_all_have_equal_rewards_leaves_the_weights_unchanged(estimator, norm_by_std, loss):
    model, ref = TinyPolicy(0), TinyPolicy(1)
    ids, mask, groups = batch()
    cfg = A.RLAlgoConfig(
        advantage=A.AdvantageConfig(estimator=estimator, norm_by_std=norm_by_std),
        loss=A.LossConfig(name=loss, dro_beta=0.1 if loss == "dro" else None),
        epochs=2,
        mini_batch_size=4,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    before = snapshot(model)
    adv, grads = rl_step(model, opt, ids, mask, groups, EQUAL, cfg, ref=ref, kl_coef=0.0)
    assert torch.count_nonzero(adv) == 0 and not A.has_learning_signal(adv, mask)
    assert grads == [0.0] * 4  # 2 epochs x 2 mini-batches, every gradient exactly zero
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_same_step_with_unequal_rewards_does_change_the_weights():
    model = TinyPolicy(0)
    ids, mask, groups = batch()
    cfg = A.RLAlgoConfig(epochs=2, mini_batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    before = snapshot(model)
    adv, grads = rl_step(model, opt, ids, mask, groups, [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0], cfg)
    assert A.has_learning_signal(adv, mask) and all(g > 0 for g in grads)
    after = snapshot(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_kl_to_a_different_reference_moves_the_weights_even_with_equal_rewards():
    """The equal-reward guarantee is about the policy gradient: a KL term still pulls."""
    model, ref = TinyPolicy(0), TinyPolicy(1)
    ids, mask, groups = batch()
    cfg = A.RLAlgoConfig(kl=A.KLConfig(coef=0.1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    before = snapshot(model)
    _, grads = rl_step(model, opt, ids, mask, groups, EQUAL, cfg, ref=ref, kl_coef=0.1)
    assert grads[0] > 0
    assert any(not torch.equal(before[k], snapshot(model)[k]) for k in before)


@pytest.mark.parametrize("estimator,loss", [("grpo", "vanilla"), ("rloo", "gspo"), ("vlrl_grpo_batch_std", "vlrl_seq_mask")])
def test_rewarded_responses_become_more_likely(estimator, loss):
    model = TinyPolicy(0)
    ids, mask, groups = batch()
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    cfg = A.RLAlgoConfig(advantage=A.AdvantageConfig(estimator=estimator), loss=A.LossConfig(name=loss), epochs=2, mini_batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)

    def seq_logp():
        with torch.no_grad():
            return (response_logprobs(model, ids)[0] * mask).sum(-1)

    start = seq_logp()
    for step in range(8):
        rl_step(model, opt, ids, mask, groups, rewards, cfg, step=step)
    gain = seq_logp() - start
    good = torch.tensor(rewards) > 0
    assert gain[good].mean() > 0 > gain[~good].mean()

"""Off-policy guidance (rlhf/guidance.py): a group with no right sample gets the record's
reference solution as one more member, scored and trained on like a sample, stored and
flagged; its missing sampling logprobs stay out of the mismatch metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.batch import response_tensors
from rlhf.guidance import end_of_turn_id, needs_guidance, reference_completion
from rlhf.mismatch import mismatch_metrics
from rollout.engine import Completion
from rollout.store import RolloutStore
from test_rl_stage import _run, _weights, build_micro_start, rl_recipe, run_until_crash, undocumented
from vlrl.data.images import RecordDataset
from vlrl.data.io import split_path
from vlrl.errors import RecipeError
from vlrl.model.loading import load_processor
from vlrl.recipe import validate_recipe
from vlrl.rl_config import RLAlgoConfig
from vlrl.tracking import read_metrics

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return build_micro_start(tmp_path_factory.mktemp("guidestart"))


class _R:
    def __init__(self, correct):
        self.correct = correct


def test_which_groups_are_guided():
    assert needs_guidance([_R(False), _R(None), _R(False)], "all_wrong")
    assert not needs_guidance([_R(False), _R(True)], "all_wrong")
    assert needs_guidance([_R(True), _R(True)], "always")


def test_the_reference_is_tokenised_as_the_policy_would_write_it(start):
    _, ckpt = start
    processor = load_processor(ckpt)
    tok = processor.tokenizer
    stop = end_of_turn_id(processor)
    assert stop == tok.convert_tokens_to_ids("<|im_end|>")
    c = reference_completion("2 + 3 = 5. The answer is \\boxed{5}.", tokenizer=tok, stop_id=stop, request_id="0-1",
                             sample_index=4, prompt_tokens=30, policy_version=7)
    assert c.token_ids[-1] == stop and c.finish_reason == "stop" and c.logprobs is None
    assert tok.decode(c.token_ids[:-1]) == "2 + 3 = 5. The answer is \\boxed{5}."
    # the chat template lays the same tokens after the generation prompt
    msgs = [{"role": "user", "content": "q"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": c.text}], tokenize=False)
    assert tok(full, add_special_tokens=False)["input_ids"][: len(tok(prompt, add_special_tokens=False)["input_ids"]) + len(c.token_ids)] == (
        tok(prompt, add_special_tokens=False)["input_ids"] + c.token_ids
    )


def _completion(ids, logprobs):
    return Completion(request_id="r", sample_index=0, token_ids=ids, text="x", logprobs=logprobs, finish_reason="stop",
                      prompt_tokens=3, policy_version=0)


def test_an_unsampled_row_leaves_the_mismatch_metrics_as_the_sampled_rows_give_them():
    sampled = [_completion([5, 6, 7], [-0.1, -0.2, -0.3]), _completion([8, 9], [-1.0, -0.5])]
    guide = _completion([4, 4, 4, 4], None)
    _, mask_s, lp_s = response_tensors(sampled, pad=0)
    _, mask_g, lp_g = response_tensors(sampled + [guide], pad=0)
    assert lp_g is not None and torch.isnan(lp_g[2, :4]).all() and not torch.isnan(lp_g[:2]).any()
    old_s = torch.tensor([[-0.2, -0.2, -0.1], [-0.9, -0.7, 0.0]])
    old_g = torch.zeros(3, 4)
    old_g[:2, :3] = old_s
    old_g[2] = -2.0
    a, b = mismatch_metrics(old_s, lp_s, mask_s), mismatch_metrics(old_g, lp_g, mask_g)
    assert a.keys() == b.keys()
    for k in a:
        assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), k
    assert math.isfinite(b["mismatch/abs_diff_mean"])


def test_guidance_refuses_the_mismatch_correction():
    with pytest.raises(ValueError, match="guidance"):
        RLAlgoConfig.model_validate({"guidance": {"enabled": True}, "mismatch": {"is_level": "token"}})
    RLAlgoConfig.model_validate({"guidance": {"enabled": True}})


GUIDED = {"algo": {"guidance": {"enabled": True}}}


def test_guided_groups_train_on_the_reference_and_store_it_flagged(start, tmp_path):
    data, ckpt = start
    out = _run(rl_recipe(tmp_path / "g", data, ckpt, steps=3, **GUIDED))
    records = {r.id: r for r in RecordDataset(split_path(data, "train")).records}
    with RolloutStore(out / "rollouts.sqlite", readonly=True) as store:
        rows = store.query(limit=10_000, sort_by="id")
    guides = [r for r in rows if r.meta.get("guided")]
    sampled = [r for r in rows if not r.meta.get("guided")]
    assert len(sampled) == 3 * 4 * 4  # every sample is still there
    by_group: dict = {}
    for r in sampled:
        by_group.setdefault((r.step, r.group_id), []).append(r)
    wrong = {k for k, v in by_group.items() if not any(x.meta.get("correct") for x in v)}
    assert wrong, "the micro checkpoint should miss some prompts"
    assert {(r.step, r.group_id) for r in guides} == wrong  # exactly the groups with no right sample
    for g in guides:
        assert g.response == records[g.record_id].target_text() and g.sample_index == 4
        assert g.meta["correct"] and g.advantage is not None and g.advantage > 0  # right among wrong: pushed up
        assert all(x.advantage is not None and x.advantage < 0 for x in by_group[(g.step, g.group_id)])  # the samples down
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["guidance/groups"] for m in metrics] == [float(sum(k[0] == s for k in wrong)) for s in range(3)]
    assert all(m["guidance/reference_correct"] == 1.0 for m in metrics if m["guidance/groups"])
    assert all(math.isfinite(m["mismatch/abs_diff_mean"]) and m["mismatch/abs_diff_mean"] < 1e-3 for m in metrics)
    assert undocumented(metrics) == []


def test_guidance_changes_the_update_and_resumes_exactly(start, tmp_path, monkeypatch):
    data, ckpt = start
    plain = _run(rl_recipe(tmp_path / "plain", data, ckpt, steps=4))
    ref = _run(rl_recipe(tmp_path / "ref", data, ckpt, steps=4, **GUIDED))
    a, g = _weights(plain / "checkpoint"), _weights(ref / "checkpoint")
    assert any(not torch.equal(a[k], g[k]) for k in a)
    raw = rl_recipe(tmp_path / "killed", data, ckpt, steps=4, **GUIDED)
    killed = run_until_crash(monkeypatch, raw)
    assert json.loads((killed / "state" / "rl_state.json").read_text())["step"] == 2
    _run(raw)
    b = _weights(killed / "checkpoint")
    assert all(torch.equal(g[k], b[k]) for k in g)
    with RolloutStore(ref / "rollouts.sqlite", readonly=True) as s1, RolloutStore(killed / "rollouts.sqlite", readonly=True) as s2:
        r1 = sorted((r.step, r.group_id, r.sample_index, r.response, r.advantage) for r in s1.query(limit=10_000))
        r2 = sorted((r.step, r.group_id, r.sample_index, r.response, r.advantage) for r in s2.query(limit=10_000))
    assert r1 == r2


def test_a_guidance_key_typo_names_the_key(start, tmp_path):
    data, ckpt = start
    raw = rl_recipe(tmp_path / "t", data, ckpt, algo={"guidance": {"enabeld": True}})
    with pytest.raises(RecipeError, match="guidance"):
        validate_recipe(raw)


def test_the_rollout_curves_count_the_policys_samples_only(tmp_path):
    from rollout.store import RolloutRow

    def row(i, correct, guided=False):
        return RolloutRow(run="r", stage="rl", step=0, policy_version=0, group_id="g", sample_index=i, record_id="x", task="arith",
                          prompt=[], response="1", response_tokens=9 if guided else 1, total_reward=float(correct),
                          meta={"correct": correct, **({"guided": True} if guided else {})})

    with RolloutStore(tmp_path / "s.sqlite") as store:
        store.append([row(0, False), row(1, True), row(2, True, guided=True)])
        assert store.correct_share_by_step() == {0: 0.5}
        (summary,) = store.step_summaries()
    assert (summary.n, summary.guided, summary.reward_mean, summary.reward_max) == (2, 1, 0.5, 1.0)  # the step's curves: the policy's samples
    assert summary.length_mean == 1.0  # the reference's 9 tokens are not the policy's


def test_shaping_is_luffys_function_and_its_gradient():
    from rlhf.losses import shaped_guide_loss

    logp = torch.log(torch.tensor([[0.9, 0.1, 0.01]])).requires_grad_()
    adv = torch.tensor([[2.0, 2.0, 2.0]])
    gamma = 0.1
    loss = shaped_guide_loss(logp, adv, gamma)
    p = logp.detach().exp()
    assert torch.allclose(loss, -2.0 * p / (p + gamma))
    loss.sum().backward()
    assert torch.allclose(logp.grad, -2.0 * gamma * p / (p + gamma) ** 2)  # d/dlogp of -A p/(p+g)
    assert logp.grad.abs().argmax().item() == 1  # the token at pi = gamma moves most


def _batch(rows=4, width=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(rows, width, generator=g) * 3).requires_grad_()
    adv = torch.randn(rows, 1, generator=g).expand(rows, width).clone()
    mask = torch.ones(rows, width)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return logp, adv, mask


def test_shaped_reference_rows_leave_the_pg_loss_and_share_its_denominator():
    from rlhf.agg import LossNorm
    from rlhf.losses import actor_loss

    logp, adv, mask = _batch()
    guide = torch.tensor([0.0, 1.0, 0.0, 1.0])
    plain = RLAlgoConfig.model_validate({"guidance": {"enabled": True}})
    shaped = RLAlgoConfig.model_validate({"guidance": {"enabled": True, "shaping": 0.1}})
    old = logp.detach()
    base, _ = actor_loss(logp, old, adv, mask, plain, guide_rows=guide)  # no shaping: the guide rows are ordinary rows
    assert torch.allclose(base, actor_loss(logp, old, adv, mask, plain)[0])
    assert torch.allclose(actor_loss(logp, old, adv, mask, shaped, guide_rows=torch.zeros(4))[0], base)  # no reference row: unchanged
    loss, m = actor_loss(logp, old, adv, mask, shaped, guide_rows=guide)
    n = mask.sum()  # token-mean over every row's tokens, both parts
    sampled, gm = mask * (1 - guide)[:, None], mask * guide[:, None]
    p = old.exp()
    want = ((-adv * sampled).sum() + (-adv * p / (p + 0.1) * gm).sum()) / n  # ratio 1 on the sampled rows
    assert torch.allclose(loss, want, atol=1e-6)
    assert m["actor/guide_loss"] == pytest.approx(float((-adv * p / (p + 0.1) * gm).sum() / n), abs=1e-6)
    # micro-batches with the mini-batch's denominators add up to the whole
    norm = LossNorm.of(mask)
    parts = sum(actor_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], shaped, guide_rows=guide[i:i + 2], norm=norm)[0] for i in (0, 2))
    assert torch.allclose(parts, loss, atol=1e-6)


def test_a_shaped_run_trains_differently_and_logs_the_guide_loss(start, tmp_path):
    data, ckpt = start
    unshaped = _run(rl_recipe(tmp_path / "u", data, ckpt, steps=2, algo={"guidance": {"enabled": True, "when": "always"}}))
    shaped = _run(rl_recipe(tmp_path / "s", data, ckpt, steps=2, algo={"guidance": {"enabled": True, "when": "always", "shaping": 0.1}}))
    a, b = _weights(unshaped / "checkpoint"), _weights(shaped / "checkpoint")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    metrics = read_metrics(shaped / "metrics.jsonl")
    assert all(m["actor/guide_loss"] != 0 for m in metrics) and "actor/guide_loss" not in read_metrics(unshaped / "metrics.jsonl")[0]
    assert undocumented(metrics) == []

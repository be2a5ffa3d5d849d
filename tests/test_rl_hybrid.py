"""Hybrid RL terms (issue 6), unit level: each formula by hand, and each term off at
coefficient zero (loss and gradient bitwise those of plain GRPO)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import algos as A
from rlhf.diversity import answer_pattern, distinct_n, diversity_metrics, pairwise_similarity, single_pattern
from rlhf.kl import kl_penalty
from rlhf.modes import mode_metrics, pick_mode, with_suffix
from rlhf.perception import anchor_rows, dependency_metrics, sequence_dependency, token_dependency, visual_bonus
from rollout.engine import GenerationRequest
from vlrl.data.records import Message
from vlrl.recipe_rl import RlStage

# ----------------------------------------------------------------------------- implicit perception


def test_dependency_matches_the_formula():
    real = torch.tensor([[-0.1, -0.2, -0.3], [-1.0, -2.0, 0.0]])
    masked = torch.tensor([[-1.1, -0.2, -5.0], [-0.5, -2.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    d = token_dependency(real, masked, mask)
    assert torch.allclose(d, torch.tensor([[1.0, 0.0, 0.0], [-0.5, 0.5, 0.0]]))
    assert torch.allclose(sequence_dependency(real, masked, mask, "token"), torch.tensor([0.5, 0.0]))
    assert torch.allclose(sequence_dependency(real, masked, mask, "sequence"), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError):
        sequence_dependency(real, masked, mask, "row")


def test_visual_bonus_is_capped_floored_and_gated_by_correctness():
    d = torch.tensor([2.0, 0.3, -1.0, 0.3])
    b = visual_bonus(d, coef=0.5, cap=1.0)
    assert torch.allclose(b, torch.tensor([0.5, 0.15, 0.0, 0.15]))  # 0.5 * clip(d, 0, 1)
    b = visual_bonus(d, coef=0.5, cap=1.0, correct=torch.tensor([True, True, True, False]))
    assert torch.allclose(b, torch.tensor([0.5, 0.15, 0.0, 0.0]))
    assert torch.equal(visual_bonus(d, coef=0.0, cap=1.0), torch.zeros(4))
    # entropy guard: a collapsed response (H below the floor) earns nothing
    b = visual_bonus(d, coef=0.5, cap=1.0, entropy=torch.tensor([0.01, 2.0, 2.0, 0.5]), min_entropy=0.5)
    assert torch.allclose(b, torch.tensor([0.0, 0.15, 0.0, 0.15]))
    with pytest.raises(ValueError):
        visual_bonus(d, coef=0.5, cap=1.0, min_entropy=0.5)


def test_dependency_metrics_only_over_image_rows():
    m = dependency_metrics(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([True, True, False]), torch.tensor([0.1, 0.2, 0.0]), cap=2.0)
    assert m["visual/dependency"] == pytest.approx(2.0)
    assert m["visual/capped_frac"] == pytest.approx(0.5)
    assert m["visual/dependency_pos_frac"] == pytest.approx(1.0)
    assert m["visual/bonus_mean"] == pytest.approx(0.15)
    assert dependency_metrics(torch.tensor([1.0]), torch.tensor([False]), None, 1.0) == {}


def test_masked_image_batch_keeps_layout_and_removes_pixels(micro_batch):
    from rlhf.perception import masked_image_batch

    batch = micro_batch
    masked = masked_image_batch(batch)
    assert torch.equal(masked.input_ids, batch.input_ids) and torch.equal(masked.image_grid_thw, batch.image_grid_thw)
    assert masked.pixel_values.shape == batch.pixel_values.shape and not masked.pixel_values.any()
    assert batch.pixel_values.any()  # the original is untouched
    sub = masked.select([0])
    assert not sub.pixel_values.any()


def test_masked_image_changes_logprobs_of_image_rows_only(micro_batch, micro_model):
    from rlhf.perception import masked_image_batch
    from rlhf.workers import batch_logprobs

    from rlhf.workers import batch_logprobs_entropy

    real = batch_logprobs(micro_model, micro_batch, 1.0, None)
    masked = batch_logprobs(micro_model, masked_image_batch(micro_batch), 1.0, None)
    real2, ent = batch_logprobs_entropy(micro_model, micro_batch, 1.0, 2)
    assert torch.allclose(real2, real, atol=1e-5) and bool((ent[micro_batch.response_mask > 0] > 0).all())
    d = sequence_dependency(real, masked, micro_batch.response_mask)
    has_image = torch.tensor([bool(r) for r in micro_batch.row_images])
    assert has_image.any() and (~has_image).any()
    assert torch.all(d[~has_image] == 0)
    assert torch.all(d[has_image].abs() > 0)


# ----------------------------------------------------------------------------- perception anchor


def _loss_inputs(seed=0, b=4, t=5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) - 0.1
    logp = (old + 0.05 * torch.randn(b, t, generator=g)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    mask = torch.ones(b, t)
    mask[1, 3:] = 0
    return logp, old, ref, adv, mask


def _grad(cfg, rows, kl_coef=0.0, anchor_norm=None):
    logp, old, ref, adv, mask = _loss_inputs()
    loss, m = A.actor_loss(logp, old, adv, mask, cfg, kl_coef=kl_coef, ref_logprobs=ref, anchor_rows=rows, anchor_norm=anchor_norm)
    loss.backward()
    return loss.detach(), logp.grad.clone(), m


def test_anchor_adds_coef_times_kl_over_perception_tokens():
    rows = anchor_rows(["perception", "perception", "reasoning", "text"])
    plain, _, _ = _grad(A.RLAlgoConfig(), None)
    cfg = A.RLAlgoConfig.model_validate({"perception_anchor": {"kl_coef": 0.3, "kind": "k3"}})
    loss, _, m = _grad(cfg, rows)
    logp, _, ref, _, mask = _loss_inputs()
    k3 = kl_penalty(logp.detach(), ref, "k3")  # (B, T)
    sel = mask * rows[:, None]
    expected = float((k3 * sel).sum() / sel.sum())  # token-mean over the perception tokens
    assert m["actor/perception_kl"] == pytest.approx(expected, rel=1e-5)
    assert float(loss - plain) == pytest.approx(0.3 * expected, rel=1e-4)
    # with a k3 penalty only the perception rows get an extra gradient
    _, g_plain, _ = _grad(A.RLAlgoConfig(), None)
    _, g_anch, _ = _grad(cfg, rows)
    assert torch.equal(g_plain[2:], g_anch[2:]) and not torch.equal(g_plain[:2], g_anch[:2])


def test_anchor_off_at_zero_coefficient_is_bitwise_plain():
    rows = anchor_rows(["perception", "reasoning", "perception", "text"])
    plain_loss, plain_grad, plain_m = _grad(A.RLAlgoConfig(), None)
    zero = A.RLAlgoConfig.model_validate({"perception_anchor": {"kl_coef": 0.0}})
    loss, grad, m = _grad(zero, rows)
    assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad)
    assert "actor/perception_kl" not in m and m == plain_m


def test_anchor_needs_the_reference():
    stage = dict({"from": "x", "data": "d", "steps": 1})
    assert RlStage.model_validate({**stage, "algo": {"perception_anchor": {"kl_coef": 0.1}}}).use_reference
    assert not RlStage.model_validate(stage).use_reference
    with pytest.raises(ValueError, match="perception_anchor"):
        RlStage.model_validate({**stage, "reference": "off", "algo": {"perception_anchor": {"kl_coef": 0.1}}})


# ----------------------------------------------------------------------------- diversity


def test_distinct_n_and_similarity_match_the_formulas():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[1]], 2) == 1.0
    # trigram Jaccard: "a b c d" vs "a b c e": {abc, bcd} vs {abc, bce} -> 1/3; identical -> 1
    assert pairwise_similarity(["a b c d", "a b c e", "a b c d"]) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert pairwise_similarity(["only one"]) == 0.0


def test_single_pattern_uses_the_boxed_answer():
    assert answer_pattern("so \\boxed{ 7 }.") == "7"
    assert single_pattern(["x is \\boxed{7}", "\\boxed{7}", "then \\boxed{7}"])
    assert not single_pattern(["\\boxed{7}", "\\boxed{8}"])
    m = diversity_metrics([[[1, 2], [1, 2]], [[3], [4]], [[5]]], [["\\boxed{1}", "\\boxed{1}"], ["\\boxed{1}", "\\boxed{2}"], ["lonely"]])
    assert m["diversity/single_pattern_frac"] == pytest.approx(0.5)  # the group of one says nothing
    assert m["diversity/distinct_1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["diversity/pairwise_sim"] == pytest.approx((1.0 + 0.0) / 2)


# ----------------------------------------------------------------------------- modes


def test_pick_mode_is_pure_and_follows_the_weights():
    picks = [pick_mode(3, c, [1.0, 3.0]) for c in range(4000)]
    assert picks == [pick_mode(3, c, [1.0, 3.0]) for c in range(4000)]
    assert abs(sum(picks) / len(picks) - 0.75) < 0.03
    assert {pick_mode(3, c, [1.0]) for c in range(20)} == {0}


def test_with_suffix_appends_to_the_last_user_text_and_keeps_images():
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    req = GenerationRequest(
        request_id="r",
        messages=(Message(role="system", content="sys"), Message(role="user", content=[{"type": "image"}, {"type": "text", "text": "How many?"}])),
        images=(img,),
    )
    out = with_suffix(req, "Answer briefly.")
    parts = out.messages[-1].parts()
    assert [p.type for p in parts] == ["image", "text"] and parts[-1].text == "How many? Answer briefly."
    assert out.messages[0].content == "sys" and out.images == (img,)
    assert req.messages[-1].parts()[-1].text == "How many?"


def test_mode_metrics():
    m = mode_metrics(["short", "long"], ["short", "short", "long", "long"], [2, 4, 10, 20], [True, None, False, True], [True, True, False, True])
    assert m["mode/short/frac"] == 0.5 and m["mode/short/length_mean"] == 3.0 and m["mode/short/acc"] == 1.0
    assert m["mode/long/length_mean"] == 15.0 and m["mode/long/acc"] == 0.5 and m["mode/long/stop_frac"] == 0.5


def test_modes_config_is_checked():
    stage = {"from": "x", "data": "d", "steps": 1}
    ok = RlStage.model_validate({**stage, "rollout": {"modes": [{"name": "short", "suffix": "Answer briefly.", "max_tokens": 8}]}})
    assert ok.rollout.modes[0].max_tokens == 8
    with pytest.raises(ValueError, match="distinct"):
        RlStage.model_validate({**stage, "rollout": {"modes": [{"name": "a", "suffix": "x", "max_tokens": 8}] * 2}})


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def micro_model_and_batch(tmp_path_factory):
    from rlhf.batch import build_policy_batch
    from rollout.engine import Completion
    from vlrl.data.images import RecordDataset
    from vlrl.data.io import split_path
    from vlrl.data.synth import make_dataset
    from vlrl.model.tiny import build_tiny_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hyb")
    make_dataset(root / "data", seed=2, n=40, n_eval=4)
    ds = RecordDataset(split_path(root / "data", "train"))
    img = next(i for i in range(len(ds)) if ds.records[i].images)
    txt = next(i for i in range(len(ds)) if not ds.records[i].images)
    corpus = [m.parts()[-1].text or "" for r in ds.records for m in r.messages]
    model, processor = build_tiny_model(corpus, preset="micro", seed=0)
    model.eval()
    reqs = [GenerationRequest.from_sample(ds[img], request_id="a"), GenerationRequest.from_sample(ds[txt], request_id="b")]
    comps = [Completion(request_id=r.request_id, sample_index=k, token_ids=[5, 6, 7][: 2 + k], text="x", logprobs=None, finish_reason="stop",
                       prompt_tokens=1, policy_version=0) for r in reqs for k in range(2)]
    batch = build_policy_batch(reqs, [0, 0, 1, 1], comps, processor)
    return model, batch


@pytest.fixture
def micro_batch(micro_model_and_batch):
    return micro_model_and_batch[1]


@pytest.fixture
def micro_model(micro_model_and_batch):
    return micro_model_and_batch[0]


def test_fixture_sanity(micro_batch):
    assert micro_batch.rows == 4 and not math.isnan(float(micro_batch.pixel_values.sum()))

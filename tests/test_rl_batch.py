"""The RL step's tensors: rows laid out from prompts + responses give the sampler's
logprobs back, and the once-per-image vision pass equals the per-row one."""

from __future__ import annotations

import pytest
import torch

import rlhf.batch as RB
from rollout.engine import GenerationRequest, SamplingParams
from rollout.hf_engine import HFEngine, input_only_ids
from vlrl.data.images import RecordDataset
from vlrl.data.io import split_path
from vlrl.data.synth import corpus_texts, make_dataset
from vlrl.model.tiny import build_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    data = tmp_path_factory.mktemp("rlbatch") / "data"
    make_dataset(data, seed=2, n=40, n_eval=8)
    ds = RecordDataset(split_path(data, "train"))
    model, processor = build_tiny_model(corpus_texts(0, 300), preset="micro", seed=0)
    picks = [i for i, r in enumerate(ds.records) if r.images][:3] + [i for i, r in enumerate(ds.records) if not r.images][:1]
    requests = [GenerationRequest.from_sample(ds[i], request_id=str(i)) for i in picks]
    suppress = input_only_ids(processor)
    groups = HFEngine(model, processor, suppress_token_ids=suppress).generate(requests, SamplingParams(n=3, max_new_tokens=10, seed=0))
    comps = [c for g in groups for c in g]
    batch = RB.build_policy_batch(requests, [k for k in range(len(requests)) for _ in range(3)], comps, processor)
    return model, batch, suppress


def test_trainer_logprobs_equal_the_samplers(step):
    model, batch, suppress = step
    model.eval()
    with torch.no_grad():
        lp, _ = RB.response_logprobs(model, batch, 1.0, suppress=suppress)
    assert batch.pixel_values is not None and batch.rows == 12
    assert torch.allclose(lp, batch.rollout_logprobs, atol=1e-4)
    sub = batch.select([3, 0, 10])  # a micro-batch carries its own rows' images
    with torch.no_grad():
        lp_sub, _ = RB.response_logprobs(model, sub, 1.0, suppress=suppress)
    assert torch.allclose(lp_sub, lp[[3, 0, 10]], atol=1e-5)
    trimmed = batch.select([3, 0, 10], trim=True)  # without the columns these rows do not use
    assert trimmed.input_ids.shape[1] <= sub.input_ids.shape[1] and trimmed.response_width == int(sub.response_mask.sum(1).max())
    with torch.no_grad():
        lp_trim, _ = RB.response_logprobs(model, trimmed, 1.0, suppress=suppress)
    assert torch.allclose(lp_trim, lp_sub[:, : trimmed.response_width], atol=1e-5)
    assert torch.equal(lp_sub[:, trimmed.response_width :], torch.zeros_like(lp_sub[:, trimmed.response_width :]))


def test_once_per_image_vision_pass_equals_per_row(step, monkeypatch):
    model, batch, suppress = step
    model.train().requires_grad_(True)  # the engine of the fixture froze it

    def run():
        model.zero_grad(set_to_none=True)
        lp, ent = RB.response_logprobs(model, batch, 0.7, entropy=True, entropy_grad=True, suppress=suppress)
        (lp.sum() + ent.sum()).backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert RB._shares_images(model, batch)
    lp_a, g_a = run()
    monkeypatch.setattr(RB, "_DEDUP_MODELS", ())
    assert not RB._shares_images(model, batch)
    lp_b, g_b = run()
    assert torch.equal(lp_a, lp_b)
    assert g_a.keys() == g_b.keys() and any("visual" in k for k in g_a)
    for k in g_a:
        assert torch.allclose(g_a[k], g_b[k], rtol=1e-4, atol=1e-6), k

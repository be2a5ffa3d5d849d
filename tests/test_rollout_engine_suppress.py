"""HFEngine never samples input-only tokens (the vision placeholders)."""

from __future__ import annotations

import torch

from rollout.engine import GenerationRequest, SamplingParams
from rollout.hf_engine import HFEngine, input_only_ids
from vlrl.data.records import Message
from vlrl.model.tiny import build_tiny_model

torch.set_num_threads(1)


def test_vision_placeholders_are_suppressed_and_the_mask_is_respected():
    model, processor = build_tiny_model(["a b c d e f g h"] * 20, preset="micro", seed=0)
    tok = processor.tokenizer
    vision = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    assert set(input_only_ids(processor)) == vision
    assert HFEngine(model, processor).suppress_token_ids == ()  # off unless asked (the RL stage asks)

    vocab = model.config.get_text_config().vocab_size
    allowed = {5, 9, *HFEngine(model, processor).stop_token_ids}
    engine = HFEngine(model, processor, suppress_token_ids=[i for i in range(vocab) if i not in allowed])
    req = [GenerationRequest(request_id="q", messages=(Message(role="user", content="a b"),))]
    out = engine.generate(req, SamplingParams(n=8, max_new_tokens=12, seed=0))[0]
    sampled = {t for c in out for t in c.token_ids}
    assert sampled <= allowed and len(sampled) >= 2
    # logprobs are those of the renormalised distribution over what may be sampled
    assert all(lp <= 0.0 for c in out for lp in c.logprobs) and max(lp for c in out for lp in c.logprobs) > -3.0

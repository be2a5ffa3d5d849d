"""HFEngine on the Qwen3-VL family (patch 16, deepstack, interleaved mrope): its own
position layout comes from the model, so greedy decoding still equals `model.generate`,
logprob for logprob, on a small random Qwen3-VL built here."""

import numpy as np
import pytest
import torch
from PIL import Image

from rollout.engine import GenerationRequest, SamplingParams
from rollout.hf_engine import HFEngine
from vlrl.eval import _greedy_config
from vlrl.model.batching import collate_for_generation

from vlrl_test_helpers import build_tiny_qwen3

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen3():
    model, processor = build_tiny_qwen3(
        ["What number is shown?", "\\boxed{482}", "7 + 5 = 12. Count the red shapes."] * 30, vision_depth=1, longest_edge=64
    )
    model.eval()
    tok = processor.tokenizer
    # Larger weights than the init: logits then vary a lot with position, which is what this test probes.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def test_qwen3_greedy_equals_generate(qwen3):
    model, processor = qwen3
    rng = np.random.default_rng(0)
    img = lambda: Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # noqa: E731
    requests = [
        GenerationRequest(request_id="a", messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What number is shown?"}]}], images=[img()]),
        GenerationRequest(request_id="b", messages=[{"role": "user", "content": "7 + 5 = ? Count the red shapes, then add 12."}]),
        GenerationRequest(request_id="c", messages=[{"role": "user", "content": [{"type": "text", "text": "Count"}, {"type": "image"}]}], images=[img()]),
    ]
    engine = HFEngine(model, processor, logprobs_mode="raw")
    assert engine.fast_decode
    got = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=10))

    batch = collate_for_generation(requests, processor)
    cfg = _greedy_config(model, processor, 10)
    cfg.update(return_dict_in_generate=True, output_logits=True)
    out = model.generate(**batch, generation_config=cfg)
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    ref = torch.stack(out.logits, 1).float().log_softmax(-1)  # (B, T_new, V)
    stops = set(cfg.eos_token_id)
    for b, (c,) in enumerate(got):
        row = new[b].tolist()
        end = next((i for i, t in enumerate(row) if t in stops), None)
        assert c.token_ids == (row if end is None else row[: end + 1])
        steps = torch.arange(len(c.token_ids))
        assert torch.allclose(torch.tensor(c.logprobs), ref[b, steps, torch.tensor(c.token_ids)], atol=1e-5)
    assert len({tuple(c.token_ids) for (c,) in got}) > 1  # not a degenerate constant output

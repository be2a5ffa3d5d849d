"""HFEngine on the Qwen3-VL family (patch 16, deepstack, interleaved mrope): its own
position layout comes from the model, so greedy decoding still equals `model.generate`,
logprob for logprob, on a small random Qwen3-VL built here."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from rollout.engine import GenerationRequest, SamplingParams
from rollout.hf_engine import HFEngine
from vlrl.eval import _greedy_config
from vlrl.model.batching import collate_for_generation
from vlrl.model.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen3():
    tok = train_tokenizer(["What number is shown?", "\\boxed{482}", "7 + 5 = 12. Count the red shapes."] * 30, vocab_size=512)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        ),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # Larger weights than the init: logits then vary a lot with position, which is what this test probes.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
    size = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    geometry = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=dict(size), **geometry), tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(size=dict(size), **geometry), chat_template=tok.chat_template,
    )
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

"""Small builders shared by several test files."""

from __future__ import annotations

import torch

from vlrl.model.batching import collate_for_training
from vlrl.model.tiny import build_tiny_model


def train_micro(samples, *, steps: int = 40, train_on: int = 12, seed: int = 0):
    """A micro model whose tokenizer is trained on the samples' texts, then fitted for
    `steps` full-batch steps on the first `train_on` samples: it writes boxed answers of
    varied lengths and ends them with <|im_end|> (some right), which eval and engine tests need."""
    corpus = [m.parts()[-1].text for s in samples for m in s.record.messages] * 10
    model, processor = build_tiny_model(corpus, preset="micro", seed=seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate_for_training(samples[:train_on], processor, max_length=128)
    for _ in range(steps):
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, processor


def build_tiny_qwen3(texts, *, vision_depth: int, longest_edge: int):
    """A small random Qwen3-VL (patch 16, deepstack merger, interleaved mrope) with a tokenizer
    trained on `texts`: the Qwen3 family checked without downloading a real checkpoint."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from vlrl.model.tokenizer import train_tokenizer

    tok = train_tokenizer(list(texts), vocab_size=512)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, out_hidden_size=64,
            num_position_embeddings=64, deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    size = {"shortest_edge": 32 * 32, "longest_edge": longest_edge * longest_edge}
    geometry = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=dict(size), **geometry),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(size=dict(size), **geometry),
        chat_template=tok.chat_template,
    )
    return model, processor

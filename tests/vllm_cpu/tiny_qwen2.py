"""A tiny random text-only Qwen2 checkpoint with the in-repo ChatML tokenizer, saved in
Hugging Face format: what vLLM loads in the contract test (no model hub here)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from vlrl.model.tokenizer import IM_END, PAD_TOKEN, train_tokenizer

CORPUS = [
    "What is 3 plus 4? The answer is 7. \\boxed{7}",
    "Count the shapes: there are 5 circles. \\boxed{5}",
    "Read the digits 1 2 3 and write them. \\boxed{123}",
    "Think step by step, then answer in a box.",
] * 20


def build_tiny_qwen2(out_dir: Path, seed: int = 0) -> Path:
    tok = train_tokenizer(CORPUS, vocab_size=512)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tok.convert_tokens_to_ids(IM_END), pad_token_id=tok.convert_tokens_to_ids(PAD_TOKEN),
        bos_token_id=None, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # head_dim 64: vLLM's CPU attention kernels refuse 16.
    # Larger than default init so logits are far from uniform (samples then differ from argmax).
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir

"""The tiny model factory: a real `Qwen2_5_VLForConditionalGeneration`, shrunk.

Every stage (pretraining, SFT, RL, eval) runs unchanged on this model and on a
real Qwen2.5-VL / Qwen3-VL checkpoint, because it *is* the same architecture and
processor, only with a small config and a tokenizer learned from the synthetic
corpus. That keeps the CPU demo honest: nothing downstream branches on "tiny".

Sizes are chosen so that the model can learn to read the 112x112 synthetic
images on two CPU cores within minutes. The patch geometry is Qwen2.5-VL's
(patch 14, temporal patch 2, 2x2 merge), so a 112x112 image is 8x8 patches and
16 image tokens; the image processor's pixel bounds keep 112x112 at that size
and shrink anything larger to at most 16 tokens. Real checkpoints keep the
pixel bounds saved with their own processor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from vlrl.errors import VlrlError
from vlrl.model.loading import count_parameters
from vlrl.model.tokenizer import IM_END, IMAGE_PAD, PAD_TOKEN, VIDEO_PAD, VISION_END, VISION_START, train_tokenizer

IMAGE_SIZE = 112  # synthetic images are IMAGE_SIZE x IMAGE_SIZE RGB
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
MIN_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2 * 4  # 56x56: smallest image kept as 4 tokens
MAX_PIXELS = IMAGE_SIZE * IMAGE_SIZE  # 112x112 stays 112x112 = 16 tokens; larger images shrink


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of one tiny preset. Head dims must be divisible by 4 (vision rotary)
    and the text head dim even (mrope splits it in three sections)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    vocab_size: int  # upper bound for BPE training; the learned vocabulary may be smaller
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True  # halves the embedding cost at this size


TINY_PRESETS: dict[str, TinyPreset] = {
    # The CPU demo model (~3.4 M parameters, about half of them in the vision tower).
    "tiny": TinyPreset(
        text_hidden=192,
        text_layers=4,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=512,
        vision_hidden=128,
        vision_depth=3,
        vision_heads=4,
        vision_intermediate=384,
        vocab_size=2048,
    ),
    # For fast unit tests: same structure, a fraction of the compute.
    "micro": TinyPreset(
        text_hidden=64,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=128,
        vision_hidden=64,
        vision_depth=1,
        vision_heads=2,
        vision_intermediate=128,
        vocab_size=1024,
    ),
}


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) sections
    in Qwen2.5-VL's 1/4 : 3/8 : 3/8 proportion ([16, 24, 24] for head_dim 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_config(preset: TinyPreset, tokenizer) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config whose special token ids are the tokenizer's."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (PAD_TOKEN, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)}
    head_dim = preset.text_hidden // preset.text_heads
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        max_window_layers=preset.text_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)},
        bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=preset.tie_word_embeddings,
    )
    vision_config = dict(
        depth=preset.vision_depth,
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_intermediate,
        num_heads=preset.vision_heads,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        window_size=IMAGE_SIZE,  # one window covers a whole synthetic image
        fullatt_block_indexes=[preset.vision_depth - 1],
        out_hidden_size=preset.text_hidden,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=preset.tie_word_embeddings,
    )


def build_processor(tokenizer) -> Qwen2_5_VLProcessor:
    # A fresh `size` dict each time: given min_pixels/max_pixels instead, these
    # processors write them into their class-level default dict, changing the
    # defaults of every processor built later in the process.
    geometry = dict(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE)
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, **geometry)
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, **geometry)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def build_tiny_model(texts: Iterable[str], preset: str = "tiny", seed: int = 0) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Train the tokenizer on `texts` and build a randomly initialised (seeded)
    tiny Qwen2.5-VL with its processor, in memory."""
    if preset not in TINY_PRESETS:
        raise VlrlError(f"unknown tiny preset {preset!r}: expected one of {', '.join(TINY_PRESETS)}")
    spec = TINY_PRESETS[preset]
    tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size)
    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    return model, build_processor(tokenizer)


def init_tiny_model(out_dir: Path, texts: Iterable[str], preset: str = "tiny", seed: int = 0) -> Path:
    """Build the tiny model (see `build_tiny_model`) and save model, processor
    and a provenance note (`vlrl_model.json`) to `out_dir` in Hugging Face format."""
    model, processor = build_tiny_model(texts, preset=preset, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    provenance = {
        "preset": preset,
        "seed": seed,
        "sizes": asdict(TINY_PRESETS[preset]),
        "vocab_size": len(processor.tokenizer),
        "parameters": count_parameters(model),
    }
    (out_dir / "vlrl_model.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir

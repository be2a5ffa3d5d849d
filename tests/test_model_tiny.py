"""The tiny model factory and the loader: saved checkpoints load through the Auto
classes, match the in-memory model, and bad paths fail in one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlrl.errors import VlrlError
from vlrl.model.loading import component_of, count_parameters, load_model, load_processor, set_trainable
from vlrl.model.tiny import IMAGE_SIZE, TINY_PRESETS, build_tiny_model, init_tiny_model, mrope_section

CORPUS = ["What number is shown?", "Add the numbers in the image, then multiply by 3."] + [
    f"{a} + {b} = {a + b}. {a + b} * 3 = {3 * (a + b)}. \\boxed{{{3 * (a + b)}}}" for a in range(20) for b in range(20)
]


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    return init_tiny_model(tmp_path_factory.mktemp("micro"), CORPUS, preset="micro", seed=3)


def _inputs(processor):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What number is shown?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[img], return_tensors="pt")


def test_saved_dir_loads_with_auto_classes_and_matches_in_memory(tmp_path):
    model, processor = build_tiny_model(CORPUS, preset="micro", seed=7)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    auto_proc = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    auto_model = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True)
    assert type(auto_model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(auto_proc).__name__ == "Qwen2_5_VLProcessor"

    inputs = _inputs(processor)
    assert torch.equal(inputs["input_ids"], _inputs(auto_proc)["input_ids"])
    model.eval()
    auto_model.eval()
    with torch.no_grad():
        a = model(**inputs).logits
        b = auto_model(**inputs).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_one_image_is_16_tokens_and_112_stays_112(micro_dir):
    processor = load_processor(micro_dir)
    inputs = _inputs(processor)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 16
    # A larger image is shrunk to at most 16 tokens, a smaller one is kept at its own grid.
    big = Image.new("RGB", (448, 448))
    small = Image.new("RGB", (56, 56))
    grids = processor.image_processor(images=[big, small], return_tensors="pt")["image_grid_thw"].tolist()
    assert grids == [[1, 8, 8], [1, 4, 4]]


def test_config_token_ids_consistent_with_tokenizer(micro_dir):
    model = load_model(micro_dir)
    tok = load_processor(micro_dir).tokenizer
    c = model.config
    assert c.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert c.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert c.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert c.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert c.text_config.vocab_size == len(tok)
    assert c.vision_config.out_hidden_size == c.text_config.hidden_size
    assert set(model.generation_config.eos_token_id) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
    note = json.loads((micro_dir / "vlrl_model.json").read_text())
    assert note["preset"] == "micro" and note["parameters"]["total"] == count_parameters(model)["total"]


def test_tiny_preset_parameter_count_in_range():
    # A corpus with a full 2048-token vocabulary would add (2048 - len(vocab)) * 192 parameters; stay in range either way.
    model, processor = build_tiny_model(CORPUS, preset="tiny", seed=0)
    counts = count_parameters(model)
    spare = (TINY_PRESETS["tiny"].vocab_size - len(processor.tokenizer)) * TINY_PRESETS["tiny"].text_hidden
    assert 2_000_000 <= counts["total"] and counts["total"] + spare <= 6_000_000
    assert counts["vision"] > 0 and counts["projector"] > 0 and counts["language"] > 0
    assert counts["vision"] + counts["projector"] + counts["language"] == counts["total"] == sum(p.numel() for p in model.parameters())


def test_seed_decides_the_weights():
    a, _ = build_tiny_model(CORPUS, preset="micro", seed=1)
    b, _ = build_tiny_model(CORPUS, preset="micro", seed=1)
    c, _ = build_tiny_model(CORPUS, preset="micro", seed=2)
    wa, wb, wc = (m.model.visual.patch_embed.proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_mrope_sections_cover_half_head_dim():
    for head_dim in (16, 32, 48, 64, 128):
        sec = mrope_section(head_dim)
        assert sum(sec) == head_dim // 2 and min(sec) > 0
    assert mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL's own split


def test_unknown_preset():
    """A user's error (`vlrl model init --preset huge`), one line, no traceback."""
    with pytest.raises(VlrlError, match="unknown tiny preset 'huge': expected one of tiny, micro"):
        build_tiny_model(CORPUS, preset="huge")


def test_the_recipe_names_every_preset():
    from typing import get_args

    from vlrl.recipe import ModelStage

    assert get_args(ModelStage.model_fields["preset"].annotation) == tuple(TINY_PRESETS)


def test_missing_or_invalid_path_is_one_line_error(tmp_path):
    with pytest.raises(VlrlError, match="does not exist") as e:
        load_model(tmp_path / "nope")
    assert "\n" not in str(e.value) and str(tmp_path / "nope") in str(e.value)
    with pytest.raises(VlrlError, match="has none of config.json"):
        load_model(tmp_path)
    with pytest.raises(VlrlError, match="processor path .* has none of"):
        load_processor(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(VlrlError, match="is a file"):
        load_model(tmp_path / "file.txt")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(VlrlError, match=f"cannot load model from {tmp_path}"):
        load_model(tmp_path)


def test_trainable_flag(micro_dir):
    frozen = load_model(micro_dir, trainable=False)
    assert not frozen.training and count_parameters(frozen)["trainable"] == 0
    live = load_model(micro_dir, dtype="float32")
    assert live.training and count_parameters(live)["trainable"] == count_parameters(live)["total"]
    with pytest.raises(VlrlError, match="unknown dtype"):
        load_model(micro_dir, dtype="float13")


def test_component_names_across_qwen_families():
    # Qwen2.5-VL and Qwen3-VL parameter names in transformers 5.x.
    assert component_of("model.visual.patch_embed.proj.weight") == "vision"
    assert component_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert component_of("model.visual.pos_embed.weight") == "vision"  # Qwen3-VL
    assert component_of("model.visual.merger.mlp.0.weight") == "projector"
    assert component_of("model.visual.merger.linear_fc1.weight") == "projector"  # Qwen3-VL
    assert component_of("model.visual.deepstack_merger_list.1.linear_fc2.bias") == "projector"  # Qwen3-VL
    assert component_of("model.language_model.layers.3.mlp.up_proj.weight") == "language"
    assert component_of("model.language_model.embed_tokens.weight") == "language"
    assert component_of("lm_head.weight") == "language"


@pytest.mark.parametrize(
    ("train", "expect"),
    [({"vision", "projector"}, {"vision", "projector"}), ({"projector"}, {"projector"}), ({"language"}, {"language"})],
)
def test_set_trainable_phases(micro_dir, train, expect):
    model = load_model(micro_dir)
    counts = set_trainable(model, train)
    assert counts["trainable"] == sum(counts[c] for c in expect)
    for name, p in model.named_parameters():
        assert p.requires_grad == (component_of(name) in expect), name

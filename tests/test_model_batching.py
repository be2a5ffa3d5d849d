"""Qwen-VL batching: image tokens, assistant-only labels, truncation, and padding
invariance of logits (3D mrope positions) for right- and left-padded batches."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlrl.data.images import Sample
from vlrl.data.records import Record
from vlrl.errors import DataError, VlrlError
from vlrl.model.batching import IGNORE_INDEX, collate_for_generation, collate_for_training
from vlrl.model.tiny import build_tiny_model

CORPUS = [
    "What number is shown?",
    "Add the numbers in the image, then multiply by 3.",
    "7 + 5 = 12. 12 * 3 = 36. \\boxed{36}",
    "Be brief.",
] * 40


@pytest.fixture(scope="module")
def mp():
    torch.manual_seed(0)
    model, processor = build_tiny_model(CORPUS, preset="micro", seed=0)
    model.eval()
    return model, processor


_rng = np.random.default_rng(0)


def _img(size: int = 112) -> Image.Image:
    return Image.fromarray(_rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _sample(i: int, n_img: int, question: str, answer: str | None, system: str | None = None) -> Sample:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": [{"type": "image"}] * n_img + [{"type": "text", "text": question}]})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    rec = Record(id=f"r{i}", messages=msgs, images=[f"{i}_{k}.png" for k in range(n_img)], answer="36")
    return Sample(rec, [_img() for _ in range(n_img)], i + 1)


def _mixed() -> list[Sample]:
    return [
        _sample(0, 1, "What number is shown?", "\\boxed{482}"),
        _sample(1, 0, "What is 3 + 4? Explain every step of the addition slowly.", "3 + 4 = 7. \\boxed{7}", system="Be brief."),
        _sample(2, 2, "Add the numbers in the image, then multiply by 3.", "7 + 5 = 12. 12 * 3 = 36. \\boxed{36}"),
    ]


def _loss_text(batch, processor, row) -> str:
    labels = [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]
    return processor.tokenizer.decode(labels)


def test_labels_cover_exactly_the_assistant_turn(mp):
    _, processor = mp
    samples = _mixed()
    batch = collate_for_training(samples, processor, max_length=256)
    for row, s in enumerate(samples):
        assert _loss_text(batch, processor, row) == s.record.target_text() + "<|im_end|>"
        # Loss tokens are one contiguous run ending at <|im_end|>.
        idx = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert idx == list(range(idx[0], idx[-1] + 1))
        assert batch["input_ids"][row, idx[-1]] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_labels_in_multi_turn_conversation(mp):
    _, processor = mp
    rec = Record(
        id="mt",
        messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What number is shown?"}]},
            {"role": "assistant", "content": "\\boxed{12}"},
            {"role": "user", "content": "Multiply by 3."},
            {"role": "assistant", "content": "12 * 3 = 36. \\boxed{36}"},
        ],
        images=["a.png"],
    )
    batch = collate_for_training([Sample(rec, [_img()], 1)], processor, max_length=256)
    assert _loss_text(batch, processor, 0) == "\\boxed{12}<|im_end|>12 * 3 = 36. \\boxed{36}<|im_end|>"


def test_loss_on_all_skips_only_image_and_pad_tokens(mp):
    _, processor = mp
    batch = collate_for_training(_mixed(), processor, loss_on="all", max_length=256)
    image_id = processor.image_token_id
    expected = (batch["attention_mask"] == 1) & (batch["input_ids"] != image_id)
    assert torch.equal(batch["labels"] != IGNORE_INDEX, expected)


def test_image_tokens_grids_and_token_types(mp):
    _, processor = mp
    samples = _mixed()
    batch = collate_for_training(samples, processor, max_length=256)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    assert batch["pixel_values"].shape == (3 * 64, 3 * 2 * 14 * 14)
    n_img = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert n_img == [16, 0, 32]
    assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == processor.image_token_id)
    # Right padding: every row's real tokens come first.
    for row in batch["attention_mask"].tolist():
        assert row == sorted(row, reverse=True)


def test_ids_match_the_processor_on_its_own(mp):
    _, processor = mp
    samples = _mixed()
    batch = collate_for_generation(samples, processor)
    for row, s in enumerate(samples):
        msgs = [m.model_dump(exclude_none=True) for m in s.record.prompt_messages()]
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ref = processor(text=[text], images=s.images or None)["input_ids"][0]
        got = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert got == list(ref)
        assert batch["attention_mask"][row, -1] == 1  # left padding: prompts end together


def test_text_only_batch_has_no_pixels(mp):
    model, processor = mp
    samples = [_sample(5, 0, "What is 3 + 4?", "\\boxed{7}"), _sample(6, 0, "Be brief.", "ok")]
    batch = collate_for_training(samples, processor, max_length=64)
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    assert torch.isfinite(model(**batch).loss)


def _per_sample_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits  # (B, T, V)


def test_right_padded_training_batch_equals_samples_alone(mp):
    model, processor = mp
    samples = _mixed()
    batch = collate_for_training(samples, processor, max_length=256)
    logits = _per_sample_logits(model, batch)
    for row, s in enumerate(samples):
        alone = collate_for_training([s], processor, max_length=256)
        ref = _per_sample_logits(model, alone)[0]
        n = ref.shape[0]
        assert torch.allclose(logits[row, :n], ref, atol=1e-5)
        loss_b = torch.nn.functional.cross_entropy(logits[row, :-1], batch["labels"][row, 1:], ignore_index=IGNORE_INDEX)
        loss_a = torch.nn.functional.cross_entropy(ref[:-1], alone["labels"][0, 1:], ignore_index=IGNORE_INDEX)
        assert abs(loss_b.item() - loss_a.item()) < 1e-5


def test_left_padded_generation_batch_equals_samples_alone(mp):
    model, processor = mp
    samples = [_sample(i, n, q, None) for i, (n, q) in enumerate([(1, "What number is shown?"), (0, "What is 3 + 4? Say it slowly."), (2, "Add the numbers.")])]
    batch = collate_for_generation(samples, processor)
    logits = _per_sample_logits(model, batch)
    gen = model.generate(**batch, do_sample=False, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    for row, s in enumerate(samples):
        alone = collate_for_generation([s], processor)
        ref = _per_sample_logits(model, alone)[0]
        n = ref.shape[0]
        assert torch.allclose(logits[row, -n:], ref, atol=1e-5)
        # Decoding steps after the prompt (KV cache, rope deltas) agree too.
        one = model.generate(**alone, do_sample=False, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
        assert gen.sequences[row, width:].tolist() == one.sequences[0, n:].tolist()
        for step_b, step_a in zip(gen.scores, one.scores):
            assert torch.allclose(step_b[row], step_a[0], atol=1e-4)


def test_truncation_keeps_images_or_fails(mp):
    _, processor = mp
    s = _sample(0, 1, "Add the numbers in the image, then multiply by 3.", "7 + 5 = 12. 12 * 3 = 36. \\boxed{36}")
    full = collate_for_training([s], processor, max_length=256)
    n = full["input_ids"].shape[1]
    cut = collate_for_training([s], processor, max_length=n - 5)
    assert cut["input_ids"].shape[1] == n - 5
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, : n - 5])
    assert torch.equal(cut["labels"][0], full["labels"][0, : n - 5])
    with pytest.raises(DataError, match="record r0: .* exceed max_length=10 .* cut its image tokens"):
        collate_for_training([s], processor, max_length=10)


def test_image_count_mismatch_is_a_data_error(mp):
    _, processor = mp
    s = _sample(0, 1, "What number is shown?", "\\boxed{1}")
    bad = Sample(s.record, [], 1)
    with pytest.raises(DataError, match="record r0: messages have 1 image placeholder"):
        collate_for_training([bad], processor, max_length=64)


def test_batches_drive_3d_mrope_positions(mp):
    """The batch carries what the model needs for 3D positions: image tokens get
    (t, h, w) grid positions and the text after an image resumes at
    start + max(h, w) / merge, not start + the number of image tokens."""
    model, processor = mp
    batch = collate_for_training(_mixed(), processor, max_length=256)
    pos, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )  # (3, B, T)
    row = 0
    img = (batch["input_ids"][row] == processor.image_token_id).nonzero().flatten()
    first, last = int(img[0]), int(img[-1])
    start = int(pos[0, row, first])
    assert pos[1, row, first : last + 1].tolist() == [start + i // 4 for i in range(16)]  # height: 4 rows of 4
    assert pos[2, row, first : last + 1].tolist() == [start + i % 4 for i in range(16)]  # width
    assert pos[0, row, last + 1] == start + 4  # vision_end right after the 4x4 grid
    with torch.no_grad():
        ours = model(**batch).logits
        explicit = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}, position_ids=pos).logits
        flat = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits  # 1D fallback
    assert torch.allclose(ours, explicit, atol=1e-6)
    assert not torch.allclose(ours[row], flat[row], atol=1e-3)


# Qwen2.5-VL-Instruct's template shape: a default system turn when none is given,
# no {% generation %} markers. The loss mask must still find the assistant turns.
_QWEN_STYLE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_loss_mask_with_a_qwen_style_template(mp):
    _, processor = mp
    samples = _mixed()
    original = processor.chat_template
    processor.chat_template = _QWEN_STYLE
    try:
        batch = collate_for_training(samples, processor, max_length=256)
    finally:
        processor.chat_template = original
    text0 = processor.tokenizer.decode(batch["input_ids"][0])
    assert text0.startswith("<|im_start|>system\nYou are a helpful assistant.")
    for row, s in enumerate(samples):
        assert _loss_text(batch, processor, row) == s.record.target_text() + "<|im_end|>"


def test_template_that_rewrites_history_is_refused(mp):
    _, processor = mp
    original = processor.chat_template
    processor.chat_template = "{{ messages | length }}" + original  # every render starts differently
    try:
        with pytest.raises(VlrlError, match="growing prefixes"):
            collate_for_training(_mixed()[:1], processor, max_length=256)
    finally:
        processor.chat_template = original

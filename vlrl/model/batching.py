"""Turning records and their images into Qwen-VL model inputs.

What has to be right for a Qwen-VL batch, and where it is done:

- Each image placeholder becomes `prod(image_grid_thw) / merge**2` image tokens.
  The checkpoint's own processor does this expansion (so a real Qwen2.5-VL /
  Qwen3-VL gets exactly its own layout); we render the chat template, hand the
  texts and the flat image list to the processor unpadded, and pad ourselves.
- 3D mrope positions are computed by the model's forward (and by `generate`)
  from `input_ids`, `image_grid_thw`, `attention_mask` and `mm_token_type_ids`.
  Without `mm_token_type_ids` the model silently falls back to 1D positions, so
  every batch here carries it. Padding positions are skipped through the
  attention mask, which is what makes right-padded training and left-padded
  generation give the same per-sample logits as unbatched runs (tested).
- The loss mask covers assistant turns only. It is found by rendering chat
  prefixes (conversation before turn i with the generation prompt, and through
  turn i) and taking the character span between them, then mapping characters
  to tokens through the tokenizer's offsets. This needs no `{% generation %}`
  markers, so it works with real checkpoints' templates. The span ends at the
  turn's end-of-turn token (`<|im_end|>`), which is trained so the model learns
  to stop; the newline after it is not.
- Image tokens never carry loss, and truncation never cuts into them: a sample
  whose image tokens do not fit in `max_length` is an error naming the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Protocol

import torch
from PIL import Image

from vlrl.data.records import Message, Record
from vlrl.errors import DataError, VlrlError

IGNORE_INDEX = -100  # label value that the loss skips


class Sample(Protocol):
    """A record with its images loaded, in placeholder order
    (`vlrl.data.images.Sample` is one)."""

    record: Record
    images: list[Image.Image]


class _Encoded(NamedTuple):
    input_ids: list[int]  # (T,)
    loss_mask: list[bool]  # (T,) True on tokens that may carry loss
    mm_token_type_ids: list[int]  # (T,) 0 text, 1 image, 2 video


def chat_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Records' messages as the plain dicts chat templates expect."""
    return [m.model_dump(exclude_none=True) for m in messages]


def _render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(processor, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns' content in the rendered `full`
    text, each ending with the turn's end token, without trailing whitespace."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_prompt(processor, messages[:i])
        through = _render(processor, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise VlrlError(
                f"the checkpoint's chat template does not render conversations as growing prefixes (assistant turn {i}), "
                "so vlrl cannot locate the assistant tokens for the loss mask; use loss_on='all' or a ChatML template"
            )
        spans.append((len(before), len(through.rstrip())))
    return spans


def _render_prompt(processor, messages: list[dict]) -> str:
    if messages:
        return _render(processor, messages, add_generation_prompt=True)
    # An assistant turn that opens the conversation: some templates reject an
    # empty conversation, so take the generation prompt off a probe turn.
    probe = [{"role": "user", "content": ""}]
    return _render(processor, probe, add_generation_prompt=True)[len(_render(processor, probe, add_generation_prompt=False)) :]


def _encode(processor, texts: list[str], images: list[Image.Image]) -> dict[str, Any]:
    """Processor call without padding: expanded ids, offsets, pixels."""
    kwargs: dict[str, Any] = dict(
        text=texts,
        padding=False,
        truncation=False,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_mm_token_type_ids=True,
    )
    if images:
        kwargs["images"] = images
    out = processor(**kwargs)
    if images and out["image_grid_thw"].shape[0] != len(images):
        raise ValueError(f"processor returned {out['image_grid_thw'].shape[0]} image grids for {len(images)} images")
    return out


def _strip_placeholders(text: str, pos: int, placeholders: tuple[str, ...]) -> int:
    """Position `pos` of `text` counted without the image/video placeholder
    strings before it. The processor only repeats placeholders when it expands
    them, so this coordinate is the same in the rendered and the expanded text."""
    head = text[:pos]
    return pos - sum(head.count(ph) * len(ph) for ph in placeholders)


def _token_starts_stripped(ids: list[int], offsets: list[tuple[int, int]], placeholder_lens: dict[int, int]) -> list[int]:
    """Each token's start offset in the expanded text, in the stripped coordinate."""
    starts, removed = [], 0
    for tok, (start, _) in zip(ids, offsets):
        starts.append(start - removed)
        removed += placeholder_lens.get(tok, 0)
    return starts


def _encode_samples(
    samples: Sequence[Sample], processor, *, add_generation_prompt: bool, loss_on: Literal["assistant", "all"]
) -> tuple[list[_Encoded], dict[str, torch.Tensor]]:
    conversations, texts, images = [], [], []
    for s in samples:
        _check_images(s)
        msgs = chat_dicts(s.record.prompt_messages() if add_generation_prompt else s.record.messages)
        text = _render(processor, msgs, add_generation_prompt=add_generation_prompt)
        if text.count(processor.image_token) != len(s.images):
            raise DataError(
                f"record {s.record.id}: chat template rendered {text.count(processor.image_token)} image placeholder(s) "
                f"for {len(s.images)} image(s)"
            )
        conversations.append(msgs)
        texts.append(text)
        images.extend(s.images)

    out = _encode(processor, texts, images)
    placeholders = (processor.image_token, processor.video_token)
    placeholder_lens = {processor.image_token_id: len(processor.image_token), processor.video_token_id: len(processor.video_token)}
    encoded = []
    for b, (msgs, text) in enumerate(zip(conversations, texts)):
        ids = list(out["input_ids"][b])
        if loss_on == "all":
            loss_mask = [True] * len(ids)
        else:
            strip = [_strip_placeholders(text, a, placeholders) for span in assistant_char_spans(processor, msgs, text) for a in span]
            spans = list(zip(strip[::2], strip[1::2]))
            starts = _token_starts_stripped(ids, out["offset_mapping"][b], placeholder_lens)
            loss_mask = [any(a <= start < e for a, e in spans) for start in starts]
        mm = list(out["mm_token_type_ids"][b])
        loss_mask = [m and t == 0 for m, t in zip(loss_mask, mm)]  # never on image/video tokens
        encoded.append(_Encoded(ids, loss_mask, mm))
    vision = {}
    if images:
        vision = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}  # (sum patches, C*t*p*p), (N_img, 3)
    return encoded, vision


def _check_images(s: Sample) -> None:
    n = sum(m.n_images() for m in s.record.messages)
    if n != len(s.images):
        raise DataError(f"record {s.record.id}: messages have {n} image placeholder(s) but {len(s.images)} image(s) were loaded")


def _truncate(e: _Encoded, max_length: int, record_id: str, vision_end_id: int | None) -> _Encoded:
    if len(e.input_ids) <= max_length:
        return e
    # The last token that belongs to an image block (its tokens or its end marker).
    last_vision = max(
        (i for i, (t, tok) in enumerate(zip(e.mm_token_type_ids, e.input_ids)) if t != 0 or tok == vision_end_id), default=-1
    )
    if last_vision >= max_length:
        raise DataError(
            f"record {record_id}: {len(e.input_ids)} tokens exceed max_length={max_length} and truncating would cut its "
            f"image tokens (last at position {last_vision}); raise max_length or use smaller images"
        )
    return _Encoded(e.input_ids[:max_length], e.loss_mask[:max_length], e.mm_token_type_ids[:max_length])


def _pad(rows: list[list[int]], value: int, side: Literal["left", "right"]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + r) if side == "left" else (r + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def pad_id(processor) -> int:
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load processors through vlrl.model.loading.load_processor")
    return tok.pad_token_id


def collate_for_training(
    samples: Sequence[Sample],
    processor,
    *,
    loss_on: Literal["assistant", "all"] = "assistant",
    max_length: int,
) -> dict[str, torch.Tensor]:
    """Right-padded training batch: input_ids, attention_mask, labels,
    mm_token_type_ids, and pixel_values + image_grid_thw when any sample has
    images. `loss_on="all"` trains on every text token (language pretraining,
    captions); "assistant" only on assistant turns. Pass the dict to
    `model(**batch)`; the model shifts labels itself."""
    if not samples:
        raise ValueError("collate_for_training got an empty list of samples")
    encoded, vision = _encode_samples(samples, processor, add_generation_prompt=False, loss_on=loss_on)
    vision_end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    encoded = [_truncate(e, max_length, s.record.id, vision_end) for e, s in zip(encoded, samples)]
    labels = [[tok if keep else IGNORE_INDEX for tok, keep in zip(e.input_ids, e.loss_mask)] for e in encoded]
    batch = {
        "input_ids": _pad([e.input_ids for e in encoded], pad_id(processor), "right"),  # (B, T)
        "attention_mask": _pad([[1] * len(e.input_ids) for e in encoded], 0, "right"),  # (B, T)
        "labels": _pad(labels, IGNORE_INDEX, "right"),  # (B, T)
        "mm_token_type_ids": _pad([e.mm_token_type_ids for e in encoded], 0, "right"),  # (B, T)
    }
    return batch | vision


def collate_for_generation(samples: Sequence[Sample], processor) -> dict[str, torch.Tensor]:
    """Left-padded prompts (the record without its trailing assistant turn, with
    the generation prompt) for batched `model.generate(**batch)`; new tokens
    start at column `batch["input_ids"].shape[1]` for every row."""
    if not samples:
        raise ValueError("collate_for_generation got an empty list of samples")
    encoded, vision = _encode_samples(samples, processor, add_generation_prompt=True, loss_on="all")
    batch = {
        "input_ids": _pad([e.input_ids for e in encoded], pad_id(processor), "left"),  # (B, T)
        "attention_mask": _pad([[1] * len(e.input_ids) for e in encoded], 0, "left"),  # (B, T)
        "mm_token_type_ids": _pad([e.mm_token_type_ids for e in encoded], 0, "left"),  # (B, T)
    }
    return batch | vision

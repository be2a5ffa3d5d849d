"""Online packing: several records in one fixed-length row, each attending only to itself.

How a packed row reaches Qwen-VL without any attention across record boundaries
(transformers 5.x, every attention backend):

- `position_ids` has four rows, (4, R, T): row 0 holds plain text positions that
  restart at 0 for every record, rows 1-3 the 3-D mrope positions (temporal,
  height, width) of each record computed on its own, so image positions restart
  per record too. The checkpoint's own `get_rope_index` computes them (passed in
  as `rope_index`), so Qwen2.5-VL and Qwen3-VL each get their own layout.
- The 2-D `attention_mask` must not reach the model: transformers builds the
  block-diagonal causal mask from the restarts in row 0 of `position_ids` only
  when the mask is None and there is no KV cache (flash attention uses the same
  restarts as varlen boundaries). `PackedForward` drops the mask and sets
  `use_cache=False`; the batch keeps the mask so the trainer can count real tokens.
- Labels of each record's first token are IGNORE (in an unpacked row nothing
  predicts the first token), so the last token of one record is never trained
  to predict the first token of the next.
- Pixels and image grids are concatenated in the order their image tokens appear
  row by row, which is the order the model scatters image embeddings in.

Departure from MindVL: rows are filled first-fit from the sampler's stream with a
small look-ahead; a record that fits no row waits in `pending` for the next
batch (where it is placed first), so the consumed data is a cursor plus a short
pending list, both saved in the trainer state for exact resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlrl.model.batching import IGNORE_INDEX, collate_for_training, pad_id
from vlrl.model.packed_attention import segments_from_positions, use_packed_sdpa


@dataclass
class Segment:
    """One record, encoded and unpadded."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) IGNORE_INDEX where no loss
    mm_token_type_ids: torch.Tensor  # (L,) 0 text, 1 image
    pixel_values: torch.Tensor | None  # (patches, C*t*p*p) of its images, or None
    image_grid_thw: torch.Tensor | None  # (n_images, 3), or None

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def image_tokens(self) -> int:
        return int((self.mm_token_type_ids != 0).sum())


def encode_segments(samples: Sequence, processor, *, max_length: int, loss_on: str = "assistant") -> list[Segment]:
    """Each sample as its own unpadded segment (one processor call for all of them)."""
    batch = collate_for_training(samples, processor, loss_on=loss_on, max_length=max_length)
    grids = batch.get("image_grid_thw")  # (N_img, 3)
    pixels = batch.get("pixel_values")  # (sum patches, D)
    patch_counts = grids.prod(dim=1).tolist() if grids is not None else []
    out, img, patch = [], 0, 0
    for b, s in enumerate(samples):
        n = int(batch["attention_mask"][b].sum())
        k = len(s.images)
        seg_grid = seg_pix = None
        if k:
            p = int(sum(patch_counts[img : img + k]))
            seg_grid, seg_pix = grids[img : img + k], pixels[patch : patch + p]
            img, patch = img + k, patch + p
        out.append(Segment(batch["input_ids"][b, :n], batch["labels"][b, :n], batch["mm_token_type_ids"][b, :n], seg_pix, seg_grid))
    return out


# --------------------------------------------------------------------------- planning (pure)


def fits(row_len: int, row_img: int, length: int, img: int, *, max_length: int, max_image_tokens: int | None) -> bool:
    """Whether a record fits a row. An empty row takes any record that fits its length,
    even over the image cap, so no record can wait forever."""
    if row_len + length > max_length:
        return False
    return row_len == 0 or max_image_tokens is None or row_img + img <= max_image_tokens


def first_fit(
    sizes: Sequence[tuple[int, int]], *, rows: int, max_length: int, max_image_tokens: int | None, lookahead: int
) -> tuple[list[list[int]], list[int], int]:
    """Place items (length, image tokens), in order, first-fit into `rows` rows.

    Returns (items per row, items left over, items examined). Stops once
    `lookahead` items fit nowhere; items after the stop are not examined, so a
    caller streaming from a sampler consumes exactly the examined prefix minus
    the leftovers."""
    placed: list[list[int]] = [[] for _ in range(rows)]
    used = [[0, 0] for _ in range(rows)]  # per row: tokens, image tokens
    left: list[int] = []
    examined = 0
    for i, (length, img) in enumerate(sizes):
        if length > max_length:
            raise ValueError(f"item {i} has {length} tokens, more than the pack length {max_length}")
        examined = i + 1
        for r in range(rows):
            if fits(used[r][0], used[r][1], length, img, max_length=max_length, max_image_tokens=max_image_tokens):
                placed[r].append(i)
                used[r][0] += length
                used[r][1] += img
                break
        else:
            left.append(i)
            if len(left) >= lookahead:
                break
    return placed, left, examined


# --------------------------------------------------------------------------- tensors


@dataclass
class PackedBatch:
    inputs: dict[str, torch.Tensor]  # model inputs (+ labels, attention_mask for counting)
    spans: list[tuple[int, int, int]]  # per segment, in input order: (row, start, end)

    @property
    def efficiency(self) -> float:
        """Share of the batch's token slots that hold real tokens."""
        return float(self.inputs["attention_mask"].float().mean())


def collate_packed(rows: Sequence[Sequence[Segment]], processor, *, max_length: int, rope_index: Callable) -> PackedBatch:
    """Fixed-length packed rows of segments. `rope_index` is the model's
    `model.model.get_rope_index` (3-D positions of one record)."""
    R, T = len(rows), max_length
    ids = torch.full((R, T), pad_id(processor), dtype=torch.long)  # (R, T)
    labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    mask = torch.zeros((R, T), dtype=torch.long)  # (R, T) 1 on real tokens
    mm = torch.zeros((R, T), dtype=torch.long)  # (R, T)
    pos = torch.zeros((4, R, T), dtype=torch.long)  # (4, R, T): text row, then t/h/w
    pixels, grids, spans = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for seg in row:
            n = seg.length
            if at + n > T:
                raise ValueError(f"row {r}: segments total more than the pack length {T}")
            ids[r, at : at + n] = seg.input_ids
            labels[r, at : at + n] = seg.labels
            labels[r, at] = IGNORE_INDEX
            mask[r, at : at + n] = 1
            mm[r, at : at + n] = seg.mm_token_type_ids
            pos[0, r, at : at + n] = torch.arange(n)
            pos[1:, r, at : at + n] = segment_positions(seg, rope_index)
            if seg.image_grid_thw is not None:
                pixels.append(seg.pixel_values)
                grids.append(seg.image_grid_thw)
            spans.append((r, at, at + n))
            at += n
        pos[:, r, at:] = torch.arange(T - at)  # pads: a segment of their own
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": mm, "position_ids": pos}
    if grids:
        inputs |= {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)}
    return PackedBatch(inputs, spans)


def segment_positions(seg: Segment, rope_index: Callable) -> torch.Tensor:
    """(3, L) mrope positions of one record alone, starting at 0."""
    if seg.image_grid_thw is None:
        return torch.arange(seg.length).expand(3, -1)
    p, _ = rope_index(seg.input_ids[None], mm_token_type_ids=seg.mm_token_type_ids[None], image_grid_thw=seg.image_grid_thw)
    return p[:, 0]  # (3, L)


class PackedForward(torch.nn.Module):
    """Calls the model with the 2-D attention mask dropped whenever the batch is
    packed (4-row position_ids), so the block-diagonal mask is built from the
    position restarts. With SDPA on CPU the language model also gets the records'
    boundaries and attends record by record (vlrl.model.packed_attention) instead
    of through a dense block-diagonal mask. Unpacked batches pass through unchanged.

    `by_record=None` picks by where the model is: record by record on CPU (where the
    dense mask ate most of what packing saved), the dense mask on accelerators, where
    one masked SDPA call beats many small ones (bench_sft_packing on an H200,
    2026-12-04: dense 10,824 real tok/s against 4,763 record by record)."""

    def __init__(self, model: torch.nn.Module, by_record: bool | None = None):
        super().__init__()
        self.model = model
        if by_record is None:
            by_record = next(model.parameters()).device.type == "cpu"
        self.by_record = use_packed_sdpa(model) if by_record else False

    def forward(self, **batch):
        pos = batch.get("position_ids")
        if pos is not None and pos.ndim == 3 and pos.shape[0] == 4:
            # A KV cache also turns the packed-sequence detection off, and training needs none.
            batch = {k: v for k, v in batch.items() if k != "attention_mask"} | {"use_cache": False}
            if self.by_record:
                batch["packed_segments"] = segments_from_positions(pos[0])
        return self.model(**batch)


def span_losses(logits: torch.Tensor, labels: torch.Tensor, spans: Sequence[tuple[int, int, int]]) -> list[tuple[float, int]]:
    """Summed next-token loss and label count of each segment (row, start, end)."""
    out = []
    for r, a, b in spans:
        lg = logits[r, a : b - 1].float()  # (n-1, V)
        lb = labels[r, a + 1 : b]  # (n-1,)
        keep = lb != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(lg[keep], lb[keep], reduction="sum") if keep.any() else torch.zeros(())
        out.append((float(loss.detach()), int(keep.sum())))
    return out

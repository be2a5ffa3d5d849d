"""Micro-batches for SFT from a phase's record stream, with the consumed-data tracker.

Without packing a micro-batch is the next `batch_size` stream positions. With
packing the number of records in a batch depends on their lengths, so a batch is
no longer a fixed function of the step: the feed keeps `cursor` (stream positions
drawn) and `pending` (drawn, not yet trained on), and the trainer state saves both
after every checkpointed step. A resumed feed built from them yields the same
batches as the uninterrupted run, so no record is repeated or skipped.

The feed is read between steps only: `train_steps` asks for step k's micro-batches,
runs the step, then checkpoints, so at checkpoint time the tracker describes
exactly the data of steps 0..k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sft.curriculum import RecordStream
from vlrl.data.images import RecordDataset, RecordDatasets
from vlrl.errors import VlrlError
from vlrl.model.batching import collate_for_training
from vlrl.model.packing import Segment, collate_packed, encode_segments, first_fit
from vlrl.recipe_sft import PackingSpec


@dataclass
class FeedStats:
    skipped: int = 0  # records skipped for a bad image
    consumed: int = 0  # records trained on
    real_tokens: int = 0  # since the last `window()` call
    slot_tokens: int = 0

    def window(self) -> float:
        """Packing efficiency (share of non-pad token slots) since the last call."""
        eff = self.real_tokens / self.slot_tokens if self.slot_tokens else 0.0
        self.real_tokens = self.slot_tokens = 0
        return eff


@dataclass
class Feed:
    dataset: RecordDataset | RecordDatasets
    processor: object
    stream: RecordStream
    batch_size: int
    max_length: int
    packing: PackingSpec
    rope_index: Callable | None = None  # the model's get_rope_index (packing only)
    cursor: int = 0
    pending: list[int] = field(default_factory=list)
    stats: FeedStats = field(default_factory=FeedStats)
    _cache: dict[int, Segment | None] = field(default_factory=dict)

    def steps(self, grad_accum: int) -> Iterator[list[dict]]:
        while True:
            yield [self.micro_batch() for _ in range(grad_accum)]

    def micro_batch(self) -> dict:
        return self._packed() if self.packing.enabled else self._plain()

    # ---- unpacked: the next batch_size positions (bad images dropped)

    def _plain(self) -> dict:
        for _ in range(1000):
            samples = [self.dataset[self.stream[p]] for p in range(self.cursor, self.cursor + self.batch_size)]
            self.cursor += self.batch_size
            kept = [s for s in samples if s is not None]
            self.stats.skipped += len(samples) - len(kept)
            if kept:
                batch = collate_for_training(kept, self.processor, max_length=self.max_length)
                self.stats.consumed += len(kept)
                n = int(batch["attention_mask"].sum())
                self.stats.real_tokens += n
                self.stats.slot_tokens += batch["attention_mask"].numel()
                return batch
        raise VlrlError("1000 batches in a row had only unreadable images; check the data (on_bad_image: skip)")

    # ---- packed: pending first, then the stream, first-fit into batch_size rows

    def _segment(self, p: int) -> Segment | None:
        if p not in self._cache:
            ahead = list(range(p, p + self.batch_size * 4))  # one processor call for a run of positions
            samples = {q: self.dataset[self.stream[q]] for q in ahead if q not in self._cache}
            good = [q for q, s in samples.items() if s is not None]
            segs = encode_segments([samples[q] for q in good], self.processor, max_length=self.max_length) if good else []
            self._cache.update({q: None for q in samples} | dict(zip(good, segs)))
        return self._cache[p]

    def _candidates(self, order: list[int]) -> Iterator[tuple[int, int]]:
        """Sizes of pending positions, then of fresh stream positions (advancing the cursor
        only as far as the planner looks; unreadable records are consumed and counted)."""
        for p in self.pending:
            seg = self._cache.get(p) or self._segment(p)
            order.append(p)
            yield seg.length, seg.image_tokens
        while True:
            p = self.cursor
            seg = self._segment(p)
            self.cursor += 1
            if seg is None:
                self.stats.skipped += 1
                continue
            order.append(p)
            yield seg.length, seg.image_tokens

    def _packed(self) -> dict:
        order: list[int] = []
        rows, left, _ = first_fit(
            self._candidates(order), rows=self.batch_size, max_length=self.packing.max_length,
            max_image_tokens=self.packing.max_image_tokens, lookahead=self.packing.lookahead,
        )
        self.pending = [order[i] for i in left]
        packed = collate_packed([[self._cache[order[i]] for i in row] for row in rows], self.processor,
                                max_length=self.packing.max_length, rope_index=self.rope_index)
        used = {order[i] for row in rows for i in row}
        self.stats.consumed += len(used)
        self._cache = {p: s for p, s in self._cache.items() if p >= self.cursor or p in self.pending}
        mask = packed.inputs["attention_mask"]
        self.stats.real_tokens += int(mask.sum())
        self.stats.slot_tokens += mask.numel()
        return packed.inputs

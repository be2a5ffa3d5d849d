"""Deterministic batch sampling whose only state is a cursor.

Batch k of a phase is a pure function of (seed, phase, k): an epoch-wise
permutation of the phase's records, or, with per-record weights, a weighted draw
seeded by k. So the consumed-data tracker is just `k` (MindVL's point): resume
neither repeats nor skips a sample, with no sampler state to save.
"""

from __future__ import annotations

import torch


def _gen(*keys: int) -> torch.Generator:
    g = torch.Generator()
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    g.manual_seed(seed)
    return g


class BatchSampler:
    """Index batches over `n` items; `batch(k)` is the k-th batch of the stream."""

    def __init__(self, n: int, batch_size: int, *, seed: int, phase: int = 0, weights: list[float] | None = None):
        if n <= 0:
            raise ValueError("cannot sample batches from an empty selection")
        self.n, self.batch_size, self.seed, self.phase = n, batch_size, seed, phase
        self.weights = torch.tensor(weights, dtype=torch.float64) if weights is not None else None
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(self.n, generator=_gen(self.seed, self.phase, epoch)).tolist()}
        return self._perm_cache[epoch]

    def batch(self, k: int) -> list[int]:
        if self.weights is not None:
            g = _gen(self.seed, self.phase, 1_000_000 + k)
            return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g).tolist()
        out = []
        pos = k * self.batch_size
        for p in range(pos, pos + self.batch_size):
            epoch, i = divmod(p, self.n)
            out.append(self._perm(epoch)[i])
        return out

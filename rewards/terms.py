"""Length and diversity terms: pure functions of a sample and its group.

Where these depart from the papers:

- `overlong` is DAPO's soft overlong punishment as written (shared/REFERENCES.md);
  lengths are in tokens when the sample has token ids.
- `group_length` is Kimi k1.5's length reward; a sample whose correctness is unknown
  (no reference answer, nothing to check) gets None instead of being treated as wrong.
- `conciseness` is ours (no paper formula): a correct response of length L, in a group
  whose shortest correct response has length L_min, gets L_min / L - 1, in (-1, 0];
  wrong ones and groups without a correct response get 0. It only ever costs verbose
  correct answers, so with accuracy weighted higher a correct answer still beats a
  wrong one.
- `diversity` is ours: with sim(i, j) in [0, 1] (word n-gram Jaccard by default) and
  dup_i = max over j != i of sim(i, j), a correct response gets 1 - dup_i (distinct
  correct answers earn up to +1, a copy of another response about 0) and any other
  response gets -dup_i when dup_i >= threshold (near-duplicates lose), else 0. A group
  of one gets 0.

The group terms run after the other components (`needs_scores=True`) because they need
each member's correctness; all run in-process (they are cheap and trusted).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Callable

from rewards.api import RewardSample, reward


@reward("overlong", kind="term", isolate=False, bounds=(-1.0, 0.0))
class OverlongPenalty:
    """DAPO soft overlong penalty: 0 up to max_length - cache tokens, then falling linearly to -1
    at max_length, -1 beyond."""

    def __init__(self, *, max_length: int, cache: int):
        if not (0 < cache <= max_length):
            raise ValueError(f"overlong: need 0 < cache <= max_length, got cache={cache}, max_length={max_length}")
        self.max_length, self.cache = int(max_length), int(cache)

    def __call__(self, sample: RewardSample) -> float:
        return overlong_penalty(sample.response_length or 0, self.max_length, self.cache)


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    soft_start = max_length - cache
    if length <= soft_start:
        return 0.0
    if length <= max_length:
        return (soft_start - length) / cache
    return -1.0


def group_length_lambda(lengths: list[int], i: int) -> float:
    """Kimi k1.5: lambda_i = 0.5 - (len_i - min) / (max - min); 0 when all lengths are equal."""
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return 0.0
    return 0.5 - (lengths[i] - lo) / (hi - lo)


@reward("group_length", kind="term", isolate=False, needs_scores=True, bounds=(-0.5, 0.5))
def group_length(sample: RewardSample) -> float | None:
    """Kimi k1.5 group length reward: lambda for correct responses, min(0, lambda) for wrong ones."""
    if sample.correct is None:
        return None
    lam = group_length_lambda([m.response_length or 0 for m in _members(sample)], sample.group_index if sample.group else 0)
    return lam if sample.correct else min(0.0, lam)


@reward("conciseness", kind="term", isolate=False, needs_scores=True, bounds=(-1.0, 0.0))
def conciseness(sample: RewardSample) -> float | None:
    """L_min / L - 1 for a correct response (L_min: shortest correct one in the group), else 0."""
    if sample.correct is None:
        return None
    if not sample.correct:
        return 0.0
    correct_lengths = [m.response_length or 0 for m in _members(sample) if m.correct]
    length = sample.response_length or 0
    if length <= 0:
        return 0.0
    return min(correct_lengths) / length - 1.0


# --------------------------------------------------------------------------------------
# Diversity


def ngram_set(text: str, n: int) -> frozenset:
    words = text.lower().split()
    if len(words) < n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def ngram_similarity(a: str, b: str, n: int = 3) -> float:
    """Jaccard similarity of the word n-gram sets of a and b (texts shorter than n: the whole text)."""
    return jaccard(ngram_set(a, n), ngram_set(b, n))


@lru_cache(maxsize=32)
def _similarity_fn(spec: str) -> Callable[[str, str], float]:
    mod, _, name = spec.rpartition(":")
    fn = getattr(importlib.import_module(mod), name)
    if not callable(fn):
        raise ValueError(f"diversity: similarity {spec!r} is not callable")
    return fn


@reward("diversity", kind="term", isolate=False, needs_scores=True, bounds=(-1.0, 1.0))
class Diversity:
    """Group diversity: 1 - dup for correct responses, -dup for near-duplicates (dup >= threshold),
    where dup is the highest similarity to another response of the group."""

    def __init__(self, *, n: int = 3, threshold: float = 0.8, similarity: str = "ngram"):
        if n < 1:
            raise ValueError(f"diversity: n must be >= 1, got {n}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"diversity: threshold must be in [0, 1], got {threshold}")
        self.n, self.threshold, self.similarity = n, threshold, similarity
        if similarity != "ngram":
            if ":" not in similarity:
                raise ValueError(f"diversity: similarity is 'ngram' or 'module:function', not {similarity!r}")
            _similarity_fn(similarity)  # fail at load time, not per sample

    def __call__(self, sample: RewardSample) -> float:
        members = _members(sample)
        if len(members) < 2:
            return 0.0
        me = sample.group_index if sample.group else 0
        dup = max(self._sim(members[me], m) for j, m in enumerate(members) if j != me)
        dup = min(1.0, max(0.0, float(dup)))
        if sample.correct:
            return 1.0 - dup
        return -dup if dup >= self.threshold else 0.0

    def _sim(self, a: RewardSample, b: RewardSample) -> float:
        if self.similarity == "ngram":
            return jaccard(_ngrams(a, self.n), _ngrams(b, self.n))
        return _similarity_fn(self.similarity)(a.response, b.response)


def _ngrams(s: RewardSample, n: int) -> frozenset:
    cache = s.__dict__.setdefault("_ngram_cache", {})
    if n not in cache:
        cache[n] = ngram_set(s.response, n)
    return cache[n]


def _members(sample: RewardSample) -> tuple[RewardSample, ...]:
    return sample.group if sample.group else (sample,)

"""Diversity of a step's samples, measured within each group (the G samples of one prompt):

- distinct-n: |distinct token n-grams| / |token n-grams| over the group's responses
  (Li et al. 2016, here per group, then the mean over groups); 1 = no n-gram repeats.
- pairwise similarity: mean over pairs (i < j) of the word-trigram Jaccard similarity
  (rewards.terms.ngram_similarity, the same measure the diversity reward uses).
- single-pattern share: share of groups whose responses all give the same final answer
  (the boxed answer when there is one, else the normalised text): mode collapse.

Pure functions of token ids and texts; no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from rewards.terms import ngram_similarity
from vlrl.answers import extract_boxed, normalize_text


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over the responses of one group (1.0 when there are none)."""
    grams = [tuple(r[i : i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def pairwise_similarity(texts: Sequence[str], n: int = 3) -> float:
    """Mean similarity over the pairs of one group (0.0 for a group of one)."""
    pairs = list(combinations(texts, 2))
    return sum(ngram_similarity(a, b, n) for a, b in pairs) / len(pairs) if pairs else 0.0


def answer_pattern(text: str) -> str:
    boxed = extract_boxed(text)
    return normalize_text(boxed if boxed is not None else text)


def single_pattern(texts: Sequence[str]) -> bool:
    """All responses of the group give the same answer."""
    return len({answer_pattern(t) for t in texts}) <= 1


def diversity_metrics(groups_ids: Sequence[Sequence[Sequence[int]]], groups_texts: Sequence[Sequence[str]]) -> dict[str, float]:
    """Per-step means over the groups (only groups of >= 2 samples say anything)."""
    keep = [k for k, t in enumerate(groups_texts) if len(t) >= 2]
    if not keep:
        return {}
    g = len(keep)
    return {
        "diversity/distinct_1": sum(distinct_n(groups_ids[k], 1) for k in keep) / g,
        "diversity/distinct_2": sum(distinct_n(groups_ids[k], 2) for k in keep) / g,
        "diversity/pairwise_sim": sum(pairwise_similarity(groups_texts[k]) for k in keep) / g,
        "diversity/single_pattern_frac": sum(single_pattern(groups_texts[k]) for k in keep) / g,
    }

"""Partial credit for a worked solution: the share of the reference's equations the response
gets right, number by number.

Why: the final-answer reward is all or nothing. On a problem of several steps a small
policy rarely gets every step right, so a group of eight often scores all zeros and GRPO
learns nothing from the prompt; on the ones it does score, a response that read every value
right and slipped on the last sum counts the same as one that read nothing. When the
record carries a worked reference (the task world's "3 * 5 = 15. 15 + 8 = 23. \\boxed{23}"),
comparing the response's equations with it credits each value read off the image and each
intermediate result. It is a term, not an accuracy component: it never decides whether a
response is correct, and it is None (no contribution) for a record without equations.

Scoring: the numbers of every equation ("lhs = rhs", before the box), in order, are one
sequence per text; the score is the count of positions where the response's sequence
equals the reference's, over the longer of the two, so padding with extra equations
costs and a wrong first value does not void the later ones.
"""

from __future__ import annotations

from rewards.api import RewardSample, reward
from vlrl.worked_steps import NUMBER, sentences_before_box


def equation_numbers(text: str) -> list[str]:
    """The numbers of every equation before the first \\boxed{, in order (as written)."""
    out: list[str] = []
    for sentence in sentences_before_box(text):
        if "=" in sentence:
            out += NUMBER.findall(sentence)
    return out


def step_match_score(response: str, reference: str) -> float | None:
    ref = equation_numbers(reference)
    if not ref:
        return None
    got = equation_numbers(response)
    same = sum(a == b for a, b in zip(got, ref))
    return same / max(len(ref), len(got))


@reward("step_match", kind="term", isolate=False)
def step_match(sample: RewardSample) -> float | None:
    if not sample.reference:
        return None
    return step_match_score(sample.response, sample.reference)

"""Well-behaved plugins for the stack tests, loaded by file path (`...py:NAME`)."""

from __future__ import annotations

import os

from rewards.api import RewardSample, reward

CALLS: list[str] = []  # in-process plugins record what they were called on


@reward(register=False)
def length_bonus(sample: RewardSample, *, per_word: float = 0.1) -> float:
    return per_word * len(sample.response.split())


@reward(register=False)
def pid(sample: RewardSample) -> float:
    return float(os.getpid())


@reward(register=False)
def parts(sample: RewardSample) -> dict[str, float | None]:
    return {"a": 1.0, "b": 0.5, "c": None}


@reward(register=False, kind="model", batched=True)
def fake_model(samples: list[RewardSample]) -> list[float]:
    CALLS.extend(s.response for s in samples)
    return [float(len(s.response)) for s in samples]


@reward(register=False, kind="model")
async def async_model(sample: RewardSample) -> float:
    return 0.25


@reward(register=False, batched=True)
def batched_len(samples: list[RewardSample]) -> list[float]:
    return [float(len(s.response)) for s in samples]


@reward(register=False)
def maybe(sample: RewardSample) -> float | None:
    """A rule that can decide only when the reference is a digit."""
    if sample.answer is None or not sample.answer.isdigit():
        return None
    return float(sample.response.strip() == sample.answer)


def undecorated(sample):
    return 0.75


@reward(register=False, bounds=(0.0, 1.0))
def percent(sample: RewardSample) -> float:
    """A bug bounds catch: a percentage where 0-1 was declared (100 for "ok")."""
    return 100.0 if sample.response == "ok" else 0.5


@reward(register=False, bounds=(None, 0.0))
def named_penalties(sample: RewardSample) -> dict[str, float | None]:
    return {"a": -1.0, "b": float(len(sample.response)) - 2}  # "b" > 0 for responses longer than 2


@reward(register=False, batched=True, bounds=(0.0, 10.0))
def batched_len_bounded(samples: list[RewardSample]) -> list[float]:
    return [float(len(s.response)) for s in samples]

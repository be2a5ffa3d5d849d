"""What a task generator returns: the question, the worked target and the scene.

Generators are pure functions `(rng, difficulty) -> Item`; the dataset writer
turns Items into Records and renders scenes. Keeping the image as a Scene until
the end lets `corpus_texts` draw thousands of questions without rendering.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlrl.data.synth.render import Scene


@dataclass
class Item:
    question: str  # the user's text (an image placeholder precedes it when scene is set)
    target: str  # the assistant turn: optional short work, then \boxed{answer}
    answer: str  # the reference answer, what the box holds
    meta: dict[str, Any] = field(default_factory=dict)
    scene: Scene | None = None  # None for text-only tasks


Generator = Callable[[random.Random, int], Item]


def boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def worked(steps: list[str], answer: str) -> str:
    """A reasoning target: the steps, then the box (short so CPU decoding is cheap)."""
    return " ".join(steps + [boxed(answer)])

"""The task registry: every synthetic task's name, family and generator.

Names match `vlrl.answers.TASK_ANSWER_TYPES`, which routes answer checking and
rewards by task; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlrl.data.synth import perception, reasoning, text
from vlrl.data.synth.item import Generator


@dataclass(frozen=True)
class Task:
    name: str
    family: str  # perception | reasoning | text
    generate: Generator


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("read_digits", "perception", perception.read_digits),
        Task("read_word", "perception", perception.read_word),
        Task("count_shapes", "perception", perception.count_shapes),
        Task("shape_color", "perception", perception.shape_color),
        Task("shape_position", "perception", perception.shape_position),
        Task("bbox", "perception", perception.bbox),
        Task("arith", "reasoning", reasoning.arith),
        Task("word_problem", "reasoning", reasoning.word_problem),
        Task("text_arith", "text", text.text_arith),
        Task("text_fact", "text", text.text_fact),
    )
}
FAMILIES: tuple[str, ...] = ("perception", "reasoning", "text")
FAMILY_TASKS: dict[str, tuple[str, ...]] = {f: tuple(t.name for t in TASKS.values() if t.family == f) for f in FAMILIES}
DIFFICULTIES: tuple[int, ...] = (1, 2, 3, 4, 5)

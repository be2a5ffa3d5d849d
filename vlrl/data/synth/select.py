"""Record selection for stages: which families, tasks and difficulty band to train on.

Pretraining phases and curriculum SFT each take a slice of one dataset (e.g.
warm-up on perception levels 1-2, then everything); a pure filter keeps that
choice in the recipe instead of in separate files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vlrl.data.records import Record
from vlrl.data.synth.tasks import FAMILIES
from vlrl.errors import VlrlError


def select(
    records: Iterable[Record],
    *,
    families: Iterable[str] | None = None,
    tasks: Iterable[str] | None = None,
    difficulty: tuple[int, int] | None = None,
) -> list[Record]:
    """Records whose family, task and difficulty (inclusive band) all match; None = any."""
    records = list(records)
    return [records[i] for i in select_indices(records, families=families, tasks=tasks, difficulty=difficulty)]


def select_indices(
    records: Sequence[Record],
    *,
    families: Iterable[str] | None = None,
    tasks: Iterable[str] | None = None,
    difficulty: tuple[int, int] | None = None,
) -> list[int]:
    """Positions of the matching records: samplers draw indices into the dataset."""
    fams = None if families is None else set(families)
    if fams is not None and not fams <= set(FAMILIES):
        bad = sorted(fams - set(FAMILIES))
        raise VlrlError(f"unknown family {bad[0]!r}: expected one of {', '.join(FAMILIES)}")
    task_set = None if tasks is None else set(tasks)
    lo, hi = difficulty if difficulty is not None else (1, 5)
    if not 1 <= lo <= hi <= 5:
        raise VlrlError(f"difficulty band ({lo}, {hi}) is not within 1-5 with low <= high")
    return [
        i for i, r in enumerate(records)
        if (fams is None or r.family in fams)
        and (task_set is None or r.task in task_set)
        and lo <= r.difficulty <= hi
    ]

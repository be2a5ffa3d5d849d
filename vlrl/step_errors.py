"""Why worked solutions go wrong: values read off the image, or the arithmetic on them.

Why: a wrong final answer on "read two numbers, add them" says nothing about which of the
two skills failed, and the fixes differ (perception data or a reward that pays for reading,
against arithmetic data or a reward that pays for correct steps). For every record whose
reference shows its computations ("3 * 5 = 15. 15 + 8 = 23. \\boxed{23}"), the eval reads
the response's own computations and counts, per task: responses whose first computation
uses the reference's values (read right, in any order), responses whose every computation
holds (computed right, whatever was read), and how the wrong answers split between an
arithmetic slip, steps that all hold (a misread or a wrong operation) and no steps at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from pydantic import BaseModel

from vlrl.worked_steps import computations


class StepStats(BaseModel):
    n: int  # responses to records whose reference shows at least one computation
    values_read: int  # the first computation's values are the reference's first ones
    computed: int  # at least one computation, and every one holds
    wrong: int  # final answer wrong
    wrong_slip: int  # ... with a computation that does not hold
    wrong_steps_hold: int  # ... with every computation holding: read or chose wrong
    wrong_no_steps: int  # ... with no computation written


def diagnose(rows: Iterable[tuple[str, str, str | None, bool]]) -> dict[str, StepStats]:
    """rows: (task, response, reference response, correct). Tasks without a worked
    reference are left out; the result is sorted by task."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(StepStats.model_fields, 0))
    for task, response, reference, correct in rows:
        need = computations(reference) if reference else []
        if not need:
            continue
        got = computations(response)
        all_hold = bool(got) and all(x.holds for x in got)
        c = counts[task]
        c["n"] += 1
        c["values_read"] += bool(got) and sorted(got[0].operands) == sorted(need[0].operands)
        c["computed"] += all_hold
        if not correct:
            c["wrong"] += 1
            c["wrong_no_steps" if not got else "wrong_steps_hold" if all_hold else "wrong_slip"] += 1
    return {task: StepStats(**counts[task]) for task in sorted(counts)}

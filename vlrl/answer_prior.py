"""The answer-prior baseline: how well one scores by guessing answers from the training
answers of the same task and difficulty, never looking at the prompt.

A small model can learn the answer distribution long before it learns the task, and on
tasks with few distinct answers (counts, colours, small sums) that alone scores. Beside
greedy accuracy the baseline is the commonest answer (`mode`); beside sampled pass@k it
is a guesser that draws each answer from the training distribution, whose pass@k on a
record with prior probability p is 1 - (1 - p)^k. A checkpoint whose numbers match
these has learned what answers look like, not how to find them. Answers are compared as
stripped strings (the synthetic world writes canonical answers; on other data this is a
lower bound of what `is_correct` would accept).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from vlrl.data.records import Record
from vlrl.report_cells import difficulty_cells

def _key(r: Record) -> tuple[str, int]:
    return r.task, r.difficulty


class AnswerPrior:
    def __init__(self, train: Iterable[Record]) -> None:
        self.counts: dict[tuple[str, int], Counter] = defaultdict(Counter)
        for r in train:
            if r.answer is not None:
                self.counts[_key(r)][r.answer.strip()] += 1

    def probability(self, r: Record) -> float:
        """Share of the training answers of r's task and difficulty equal to r's answer."""
        c = self.counts.get(_key(r))
        if not c or r.answer is None:
            return 0.0
        return c[r.answer.strip()] / sum(c.values())

    def mode_correct(self, r: Record) -> bool:
        c = self.counts.get(_key(r))
        return bool(c) and r.answer is not None and c.most_common(1)[0][0] == r.answer.strip()

    def pass_at(self, r: Record, k: int) -> float:
        return 1.0 - (1.0 - self.probability(r)) ** k

    def table(self, records: Sequence[Record], ks: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
        """name (family or task) -> difficulty ("1".."5", "all") -> {"mode": accuracy, "k": pass@k}."""
        grouped = difficulty_cells(records, "family") | difficulty_cells(records, "task")
        return {name: {d: self._cell(c, ks) for d, c in cells.items()} for name, cells in grouped.items()}

    def _cell(self, rows: Sequence[Record], ks: Sequence[int]) -> dict[str, float]:
        n = len(rows)
        cell = {"mode": sum(self.mode_correct(r) for r in rows) / n}
        cell.update({str(k): sum(self.pass_at(r, k) for r in rows) / n for k in ks})
        return cell

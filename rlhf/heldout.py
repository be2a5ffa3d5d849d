"""The held-out curve of an RL stage: greedy eval of the policy every `eval_every` steps.

The rollouts' rewards say how the policy does on what it trains on, at the sampling
temperature; the question a recipe asks is how its greedy answers on held-out records
move. The tiny recipe showed the two can part: its rollouts' arith accuracy rose from 57 to
66% over 150 steps while held-out greedy reasoning did not move (sampling sharpened towards
the greedy answer that was already there). So the stage measures the greedy held-out curve
itself, on a fixed subset (the first `eval_limit` records of the stage's eval split, the same
records at every point, so points are paired), from step 0.

Points go to `curve.jsonl` in the stage folder (one JSON object per line, the step's
accuracy overall / per family / per family and difficulty) and to the metrics sinks as
`heldout/accuracy` and `heldout/accuracy/<family>`. On resume, points after the resumed step
are dropped and evaluated again when their step is replayed; points at or before it stay.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from vlrl.errors import RecipeError

CURVE_FILE = "curve.jsonl"


@dataclass(frozen=True)
class CurvePoint:
    step: int
    n: int
    accuracy: float
    by_family: dict[str, float]
    # family -> difficulty ("1".."5", "all") -> accuracy
    families: dict[str, dict[str, float]]
    seconds: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, line: str) -> "CurvePoint":
        return cls(**json.loads(line))


def due_steps(every: int | None, steps: int) -> list[int]:
    """Steps (completed-step counts) at which the curve takes a point: 0, every, 2*every, ..., and the last."""
    if every is None:
        return []
    return sorted({0, *range(every, steps, every), steps})


def read_curve(stage_dir: Path) -> list[CurvePoint]:
    path = Path(stage_dir) / CURVE_FILE
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                points.append(CurvePoint.from_json(line))
            except (ValueError, TypeError):
                break  # a line cut by a crash mid-write: what follows it cannot be trusted either
    return points


def _write_curve(stage_dir: Path, points: list[CurvePoint]) -> None:
    path = Path(stage_dir) / CURVE_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(p.to_json() + "\n" for p in points))
    os.replace(tmp, path)


class HeldoutCurve:
    """Evaluates a saved policy on the stage's fixed eval subset and keeps the points."""

    def __init__(self, ctx, every: int, limit: int | None, steps: int) -> None:
        from vlrl.eval import load_eval_samples
        from vlrl.data.io import split_path
        from vlrl.runner import eval_target

        where = f"stages.{ctx.name}.eval_every"
        target = eval_target(ctx.recipe, ctx.name, ctx.dir.parent)
        if target is None:
            raise RecipeError(f"{where}: the stage has no eval (eval: false, or no eval data): set eval.data or remove eval_every")
        self.spec, data_dir = target
        self.ctx, self.every, self.steps = ctx, every, steps
        limit = limit if limit is not None else self.spec.limit
        self.samples, skipped = load_eval_samples(
            split_path(data_dir, self.spec.split), limit=limit, on_bad_image=getattr(ctx.config, "on_bad_image", "error")
        )
        if skipped:
            ctx.console.print(f"[yellow]held-out curve:[/] {len(skipped)} record(s) skipped for unreadable images: {escape(', '.join(skipped[:5]))}", highlight=False)
        self.points: list[CurvePoint] = []
        self.due: list[int] = []
        self.tmp = ctx.dir / "heldout_policy"

    def resume(self, at: int) -> "HeldoutCurve":
        """Keep the points of steps up to `at` (the step the stage resumes from); the later
        steps run again, and so do their points."""
        self.points = [p for p in read_curve(self.ctx.dir) if p.step <= at]
        _write_curve(self.ctx.dir, self.points)
        self.due = [s for s in due_steps(self.every, self.steps) if s not in {p.step for p in self.points}]
        return self

    def wants(self, step: int) -> bool:
        return step in self.due

    def take(self, step: int, save_policy, tracker) -> CurvePoint:
        """`save_policy(folder)` writes the current policy in Hugging Face format there."""
        from vlrl.eval import evaluate

        t0 = time.perf_counter()
        shutil.rmtree(self.tmp, ignore_errors=True)
        save_policy(self.tmp)
        report = evaluate(
            self.tmp, self.samples, batch_size=self.spec.batch_size, max_new_tokens=self.spec.max_new_tokens, device=self.ctx.device.kind
        )
        shutil.rmtree(self.tmp, ignore_errors=True)
        point = CurvePoint(
            step=step, n=report.n, accuracy=report.accuracy, by_family=dict(report.by_family),
            families={f: {d: s.accuracy for d, s in cells.items()} for f, cells in report.families.items()},
            seconds=round(time.perf_counter() - t0, 2),
        )
        self.points = [p for p in self.points if p.step != step] + [point]
        self.points.sort(key=lambda p: p.step)
        _write_curve(self.ctx.dir, self.points)
        tracker.log({"heldout/accuracy": point.accuracy, **{f"heldout/accuracy/{f}": a for f, a in point.by_family.items()}}, step=step)
        return point


def curve_summary(points: list[CurvePoint]) -> list[dict]:
    """What DONE.json keeps of the curve."""
    return [{"step": p.step, "accuracy": p.accuracy, "by_family": p.by_family} for p in points]


def describe_point(p: CurvePoint) -> str:
    fams = ", ".join(f"{f} {a:.1%}" for f, a in sorted(p.by_family.items()))
    return f"held-out at step {p.step}: {p.accuracy:.1%} ({fams}; {p.n} records, {p.seconds:.0f} s)"


def curve_table(points: list[CurvePoint]) -> Any:
    """Steps down, families across."""
    from rich.table import Table

    families = sorted({f for p in points for f in p.by_family})
    table = Table(title=f"held-out greedy % ({points[0].n} records)" if points else "held-out curve")
    table.add_column("step", justify="right")
    for f in families:
        table.add_column(f, justify="right")
    table.add_column("all", justify="right")
    for p in points:
        table.add_row(str(p.step), *(f"{100 * p.by_family[f]:.1f}" if f in p.by_family else "-" for f in families), f"{100 * p.accuracy:.1f}")
    return table

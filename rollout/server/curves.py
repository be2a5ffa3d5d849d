"""Per-step curves from a stage's metrics.jsonl and its rollout store, as (xs, ys) series."""

from __future__ import annotations

import math
from typing import Any

from rollout.store import RolloutStore

SKIP_KEYS = {"step", "time"}
Curve = tuple[list[float], list[float | None]]


def numeric_keys(rows: list[dict]) -> list[str]:
    """Metric names that hold a number in at least one row, sorted."""
    keys = {k for r in rows for k, v in r.items() if k not in SKIP_KEYS and _is_num(v)}
    return sorted(keys)


def metric_curve(rows: list[dict], key: str) -> Curve:
    xs, ys = [], []
    for r in rows:
        if key in r and isinstance(r.get("step"), int | float):
            xs.append(float(r["step"]))
            v = r[key]
            ys.append(float(v) if _is_num(v) else None)
    return xs, ys


def store_curves(store: RolloutStore) -> dict[str, Curve]:
    """reward mean/min/max, response length, truncated share, accuracy (share of rows whose
    meta says correct, where the writer stored a verdict) and each component's mean per step."""
    summaries = store.step_summaries()
    steps = [float(s.step) for s in summaries]
    out: dict[str, Curve] = {
        "rollouts/reward_mean": (steps, [s.reward_mean for s in summaries]),
        "rollouts/reward_min": (steps, [s.reward_min for s in summaries]),
        "rollouts/reward_max": (steps, [s.reward_max for s in summaries]),
        "rollouts/length_mean": (steps, [s.length_mean for s in summaries]),
        "rollouts/truncated_share": (steps, [s.truncated / s.n if s.n else None for s in summaries]),
    }
    correct = store.correct_share_by_step()
    if correct:
        out["rollouts/accuracy"] = (steps, [correct.get(s.step) for s in summaries])
    for name in sorted({n for s in summaries for n in s.components}):
        out[f"rollouts/component/{name}"] = (steps, [s.components.get(name) for s in summaries])
    return out


def default_metric_keys(keys: list[str]) -> list[str]:
    """The metrics worth plotting first: accuracy, reward, length and loss."""
    wanted = ("acc", "reward/total/mean", "reward_mean", "length", "loss")
    return [k for k in keys if any(w in k for w in wanted)][:8]


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

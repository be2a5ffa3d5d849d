"""Metrics sinks: JSONL always, TensorBoard / W&B (offline) / MLflow when the recipe asks.

JSONL is the source of truth that reports and resume read back; the other sinks are
views. A resumed stage appends to the same file, so readers keep the last row per
step (`read_metrics`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from vlrl.recipe import TrackingSpec


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class Tracker:
    def __init__(self, stage_dir: Path, spec: TrackingSpec | None = None, run_name: str = "vlrl", stage: str = "stage"):
        self.dir = Path(stage_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._fh = self.path.open("a", buffering=1)
        spec = spec or TrackingSpec()
        self._tb = None
        self._wandb = None
        self._mlflow = None
        if spec.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tb"))
        if spec.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(project=run_name, name=stage, dir=str(self.dir), reinit=True)
        if spec.mlflow:
            import mlflow

            mlflow.set_tracking_uri((self.dir / "mlruns").resolve().as_uri())
            mlflow.set_experiment(run_name)
            self._mlflow = mlflow.start_run(run_name=stage)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._mlflow is not None:
            import mlflow

            mlflow.log_metrics({k.replace("@", "_"): v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            import mlflow

            mlflow.end_run()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl, last write per step wins (a resumed stage re-logs steps)."""
    by_step: dict[int, dict] = {}
    if not Path(path).exists():
        return []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line after a kill
        by_step[row.get("step", -1)] = {**by_step.get(row.get("step", -1), {}), **row}
    return [by_step[k] for k in sorted(by_step)]

"""Read-only view of a run directory (`runs/<name>/`), shared by the server and the report.

A run directory holds `recipe.resolved.json` and one folder per stage with any of
`metrics.jsonl`, `eval.json`, `DONE.json`, `checkpoint/` and `rollouts.sqlite`. Stages
appear while a run trains, so nothing is cached except open store handles.

Every path handed out by this module goes through `resolve_inside`, the one place that
decides what may be read: a relative path, resolved (symlinks followed), that stays
under the run directory.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout.store import FILE_NAME, RolloutStore, StoreError
from vlrl.errors import VlrlError
from vlrl.tracking import read_metrics

RECIPE_FILE = "recipe.resolved.json"
ABLATION_GLOB = "ablation*.json"


class OutsideRunDir(VlrlError):
    """A path that would leave the run directory (absolute, `..`, or a symlink out)."""


class NoSuchStage(VlrlError):
    """A stage name that is not a folder of this run."""


@dataclass(frozen=True)
class StageFiles:
    name: str
    kind: str | None  # from the recipe; None for folders the recipe does not name
    metrics: bool
    eval: bool
    done: bool
    rollouts: bool
    checkpoint: bool
    metrics_bytes: int = 0


def resolve_inside(root: Path, rel: str) -> Path:
    """`root / rel` if it stays inside `root` after resolving symlinks, else OutsideRunDir."""
    if not rel or "\x00" in rel or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise OutsideRunDir(f"path {rel!r}: expected a path relative to the run directory")
    root = root.resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise OutsideRunDir(f"path {rel!r} leaves the run directory")
    return target


class RunDir:
    """The files of one run; store handles are opened read-only on first use and kept."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise VlrlError(f"{root}: not a run directory (no such folder)")
        self._stores: dict[str, tuple[tuple[int, int] | None, RolloutStore]] = {}  # stage -> (file identity, handle)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.recipe().get("name") or self.root.name)

    def recipe(self) -> dict[str, Any]:
        return _read_json(self.root / RECIPE_FILE) or {}

    def stage_names(self) -> list[str]:
        """Stage folders in recipe order, then any other folder that holds stage files."""
        declared = list((self.recipe().get("stages") or {}).keys())
        found = [p.name for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".") and _looks_like_stage(p)]
        return [n for n in declared if (self.root / n).is_dir()] + [n for n in found if n not in declared]

    def stage_dir(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name.startswith(".") or name not in self.stage_names():
            raise NoSuchStage(f"no stage {name!r} in {self.root} (stages: {', '.join(self.stage_names()) or 'none yet'})")
        return self.root / name

    def stages(self) -> list[StageFiles]:
        kinds = {n: (s or {}).get("kind") for n, s in (self.recipe().get("stages") or {}).items()}
        out = []
        for n in self.stage_names():
            d = self.root / n
            mpath = d / "metrics.jsonl"
            out.append(
                StageFiles(
                    name=n,
                    kind=kinds.get(n),
                    metrics=mpath.is_file(),
                    eval=(d / "eval.json").is_file(),
                    done=(d / "DONE.json").is_file(),
                    rollouts=(d / FILE_NAME).is_file(),
                    checkpoint=(d / "checkpoint" / "config.json").is_file(),
                    metrics_bytes=_size(mpath),
                )
            )
        return out

    def metrics(self, stage: str) -> list[dict]:
        return read_metrics(self.stage_dir(stage) / "metrics.jsonl")

    def eval(self, stage: str) -> dict | None:
        return _read_json(self.stage_dir(stage) / "eval.json")

    def done(self, stage: str) -> dict | None:
        return _read_json(self.stage_dir(stage) / "DONE.json")

    def heldout_curve(self, stage: str) -> list[dict]:
        """The RL stage's held-out curve (curve.jsonl: one point per line); a line cut by a
        crash ends it."""
        path = self.stage_dir(stage) / "curve.jsonl"
        points = []
        for line in (path.read_text().splitlines() if path.is_file() else []):
            try:
                points.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return [p for p in points if isinstance(p, dict) and isinstance(p.get("step"), int) and isinstance(p.get("by_family"), dict)]

    def checkpoint(self, stage: str) -> Path:
        path = self.stage_dir(stage) / "checkpoint"
        if not (path / "config.json").is_file():
            raise NoSuchStage(f"stage {stage!r} has no checkpoint yet ({path} has no config.json)")
        return path

    def store(self, stage: str) -> RolloutStore:
        """The stage's rollout store, read-only; NoSuchStage while the stage has none."""
        path = self.stage_dir(stage) / FILE_NAME
        with self._lock:
            try:
                ident = (path.stat().st_dev, path.stat().st_ino)
            except OSError:
                ident = None
            cached = self._stores.get(stage)
            if cached is not None and cached[0] != ident:  # a rerun (--force) moved the old store aside
                cached[1].close()
                del self._stores[stage]
            if stage not in self._stores:
                if ident is None:
                    raise NoSuchStage(f"stage {stage!r} has no rollout store ({FILE_NAME}) yet")
                try:
                    self._stores[stage] = (ident, RolloutStore(path, readonly=True))
                except StoreError as e:
                    raise VlrlError(str(e)) from e
            return self._stores[stage][1]

    def reward_config(self, stage: str | None = None) -> dict | None:
        """The `rewards` section that the RL stage (the given one, else the first that has
        one) was run with; None when the recipe has none."""
        stages = self.recipe().get("stages") or {}
        order = ([stage] if stage in stages else []) + [n for n in stages if n != stage]
        for n in order:
            cfg = (stages.get(n) or {}).get("rewards")
            if isinstance(cfg, dict):
                return cfg
        top = self.recipe().get("rewards")
        return top if isinstance(top, dict) else None

    def ablations(self) -> list[tuple[str, dict]]:
        """(relative path, table) of every `ablation*.json` in the run folder or a stage folder."""
        paths = sorted(self.root.glob(ABLATION_GLOB)) + sorted(p for n in self.stage_names() for p in (self.root / n).glob(ABLATION_GLOB))
        out = []
        for p in paths:
            table = ablation_table(_read_json(p))
            if table is not None:
                out.append((str(p.relative_to(self.root)), table))
        return out

    def close(self) -> None:
        with self._lock:
            for _, s in self._stores.values():
                s.close()
            self._stores.clear()


def ablation_table(data: Any) -> dict | None:
    """An ablation file as {"title", "columns", "rows"}: accepts that form or a bare list of
    row objects (columns in first-seen order); anything else is not a table (None)."""
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return None
    rows = [r for r in data["rows"] if isinstance(r, dict)]
    columns = data.get("columns")
    if not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        columns = list(dict.fromkeys(k for r in rows for k in r))
    return {"title": str(data.get("title") or ""), "columns": columns, "rows": rows}


def _looks_like_stage(p: Path) -> bool:
    return any((p / f).exists() for f in ("metrics.jsonl", "eval.json", "DONE.json", FILE_NAME, "checkpoint"))


def _size(path: Path) -> int:
    """0 for a file that is not there (yet, or any more: a rerun moves a stage folder aside)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

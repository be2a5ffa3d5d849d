"""What the eval reports share: rows grouped by family or task and difficulty, and
writing a report as a JSON file."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

DIFFICULTIES = ("1", "2", "3", "4", "5")


class JsonReport(BaseModel):
    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def difficulty_cells(rows: Iterable[Any], key: str) -> dict[str, dict[str, list]]:
    """name (each row's `key`: family or task), sorted -> difficulty ("1".."5" where it
    has rows, then "all") -> its rows."""
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        groups[getattr(r, key)].append(r)
    out = {}
    for name in sorted(groups):
        members = groups[name]
        cells = {d: [r for r in members if str(r.difficulty) == d] for d in DIFFICULTIES}
        out[name] = {d: c for d, c in cells.items() if c} | {"all": members}
    return out

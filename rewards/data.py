"""Reading responses to score from JSONL (for `vlrl rewards test` and tests).

A row is either a plain one, `{"response", "answer", "prompt"?, "task"?, "meta"?,
"group_id"?, ...}`, or a dataset `Record` (vlrl.data.records) plus a `response` field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vlrl.data.io import iter_jsonl_objects, location
from vlrl.data.records import Record
from vlrl.errors import DataError

from rewards.api import RewardSample

_SAMPLE_FIELDS = {"response_ids", "response_length", "finish_reason"}
_GROUP_KEYS = ("group_id", "group")


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file {p}: no such file")
    rows = [row for _, row in iter_jsonl_objects(p)]
    return rows


def sample_from_row(row: dict[str, Any], *, base_dir: Path | None = None, where: str = "row") -> RewardSample:
    if "response" not in row or not isinstance(row["response"], str):
        raise DataError(f"{where}: needs a string 'response' field")
    rest = {k: v for k, v in row.items() if k not in ("response", *_GROUP_KEYS, *_SAMPLE_FIELDS)}
    extra = {k: row[k] for k in _SAMPLE_FIELDS if k in row}
    group_id = next((str(row[k]) for k in _GROUP_KEYS if row.get(k) is not None), None)
    if "messages" in row:
        try:
            rec = Record.model_validate(rest)
        except ValidationError as e:
            raise DataError(f"{where}: not a valid record: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
        images = [_image_path(i, base_dir) for i in rec.images]
        return RewardSample(
            response=row["response"],
            prompt=[m.model_dump(exclude_none=True) for m in rec.prompt_messages()],
            answer=rec.answer,
            reference=rec.target_text(),
            task=rec.task,
            difficulty=rec.difficulty,
            meta=rec.meta,
            images=images,
            rewards=rec.rewards,
            id=rec.id,
            group_id=group_id or rec.id,
            **extra,
        )
    prompt = row.get("prompt", [])
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    images = [_image_path(i, base_dir) for i in row.get("images", [])]
    answer = row.get("answer")
    return RewardSample(
        response=row["response"],
        prompt=prompt,
        answer=None if answer is None else str(answer),
        reference=None if row.get("reference") is None else str(row["reference"]),
        task=str(row.get("task", "chat")),
        difficulty=int(row.get("difficulty", 1)),
        meta=dict(row.get("meta") or {}),
        images=images,
        rewards=row.get("rewards"),
        id=str(row["id"]) if "id" in row else None,
        group_id=group_id,
        **extra,
    )


def _image_path(img: Any, base_dir: Path | None) -> Any:
    """Image paths in a data file are relative to the file; bytes pass through."""
    return str(base_dir / img) if isinstance(img, str) and base_dir is not None else img


def load_samples(path: str | Path, *, group_size: int = 1) -> list[RewardSample]:
    """Samples from a JSONL file; rows without a group id are grouped `group_size` at a time."""
    p = Path(path)
    rows = read_jsonl(p)
    out = []
    for n, row in enumerate(rows):
        s = sample_from_row(row, base_dir=p.parent, where=location(p, n + 1))
        if s.group_id is None and group_size > 1:
            s.group_id = f"group{n // group_size}"
        out.append(s)
    return out

"""Reading and writing record files (JSONL or Parquet) with errors a user can act on.

Every stage loads data through here, so a bad row fails the same way everywhere:
one line naming the file, the row (the 1-based line for JSONL, the 1-based row
for Parquet), the field and what was expected.

Parquet layout: `messages` and `meta` are JSON strings (their shapes vary per
row, which Arrow columns cannot hold); `images` is a list of strings (paths) or,
when any image is inline, a list of `{bytes, path}` structs as Hugging Face
datasets write them. Inline image bytes in JSONL are written as base64 data URIs.
"""

from __future__ import annotations

import base64
import codecs
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from vlrl.data.records import Record
from vlrl.errors import DataError

FORMATS: dict[str, str] = {".jsonl": "jsonl", ".parquet": "parquet"}


def location(source: str | Path, row: int) -> str:
    """'file X line N' for JSONL, 'file X row N' otherwise (both 1-based)."""
    unit = "line" if str(source).endswith(".jsonl") else "row"
    return f"file {source} {unit} {row}"


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise DataError(f"file {path}: unknown dataset format {path.suffix!r}; expected .jsonl or .parquet")
    return fmt


def split_path(data_dir: Path, split: str) -> Path:
    """The file holding `split` in a dataset directory (or the path itself if it is a file)."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        return data_dir
    if not data_dir.exists():
        raise DataError(f"dataset {data_dir} does not exist: expected a folder holding {split}.jsonl or {split}.parquet, or a record file")
    found = [data_dir / f"{split}{ext}" for ext in FORMATS if (data_dir / f"{split}{ext}").is_file()]
    if not found:
        raise DataError(f"dataset {data_dir}: no {split}.jsonl or {split}.parquet")
    if len(found) > 1:
        manifest = data_dir / "manifest.json"
        fmt = json.loads(manifest.read_text()).get("format") if manifest.is_file() else None
        chosen = [p for p in found if FORMATS[p.suffix] == fmt]
        if not chosen:
            raise DataError(f"dataset {data_dir}: both {split}.jsonl and {split}.parquet exist; remove one")
        return chosen[0]
    return found[0]


_TYPE_TAGS = {"str", "bytes", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc: tuple) -> str:
    """Dotted field path without pydantic's union-branch tags ('str', 'list[ContentItem]')."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))


def _validation_message(e: ValidationError) -> str:
    """The most specific problem: the deepest field, with every union branch's expectation."""
    errs = e.errors()
    path = max((_field_path(err["loc"]) for err in errs), key=lambda p: p.count(".") + bool(p))
    same = [err for err in errs if _field_path(err["loc"]) == path]
    msgs = list(dict.fromkeys(err["msg"] for err in same))
    where = f"field '{path}'" if path else "record"
    got = ""
    if path and same[0].get("type") != "missing":
        text = repr(same[0].get("input"))
        got = f" (got {text[:60] + '...' if len(text) > 60 else text})"
    # union branches that failed higher up the same path are not separate problems
    others = len({q for q in (_field_path(err["loc"]) for err in errs) if not path.startswith(q)})
    more = f" [and {others} more problem(s)]" if others else ""
    return f"{where}: {', or '.join(msgs)}{got}{more}"


def _validate(obj: Any, source: Path, row: int) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{location(source, row)}: expected a JSON object (a record), got {type(obj).__name__}")
    try:
        return Record.model_validate(obj)
    except ValidationError as e:
        raise DataError(f"{location(source, row)}: {_validation_message(e)}") from None


def iter_jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object
    is a DataError naming file and line. Shared by record loading and `vlrl rewards test`.

    Lines are decoded one at a time: a file-level decode would fail on the first bad byte
    with a UnicodeDecodeError that names neither the line nor the file. A byte-order mark
    (written by some Windows tools) is dropped from the first line."""
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{location(path, line_no)}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); expected UTF-8 JSON"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # Some of json's messages end in "at" ("Invalid control character at").
                raise DataError(f"{location(path, line_no)}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{location(path, line_no)}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Record]]:
    for line_no, obj in iter_jsonl_objects(path):
        yield line_no, _validate(obj, path, line_no)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Record]]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"file {path}: not a readable Parquet file ({e})") from None
    for row_no, row in enumerate(rows, start=1):
        for key in ("messages", "meta"):
            if isinstance(row.get(key), str):
                try:
                    row[key] = json.loads(row[key])
                except json.JSONDecodeError as e:
                    raise DataError(f"{location(path, row_no)}: field '{key}' is not valid JSON ({e.msg})") from None
        if row.get("meta") is None:
            row.pop("meta", None)
        if isinstance(row.get("images"), list):
            row["images"] = [_image_from_cell(v) for v in row["images"]]
        elif row.get("images") is None:
            row.pop("images", None)
        yield row_no, _validate(row, path, row_no)


def _image_from_cell(v: Any) -> Any:
    if isinstance(v, dict):  # {bytes, path} struct
        return v.get("bytes") if v.get("bytes") is not None else v.get("path")
    return v


def iter_records(path: Path) -> Iterator[tuple[int, Record]]:
    """(row, record) pairs; row is the 1-based JSONL line or Parquet row, for messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file {path}: not found")
    yield from (_jsonl_rows(path) if _format(path) == "jsonl" else _parquet_rows(path))


def load_records(path: Path) -> list[Record]:
    return [r for _, r in iter_records(path)]


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _plain(record: Record) -> dict[str, Any]:
    d = record.model_dump()
    for m in d["messages"]:
        if isinstance(m["content"], list):
            m["content"] = [{k: v for k, v in item.items() if v is not None} for item in m["content"]]
    return d


def write_records(path: Path, records: Iterable[Record]) -> None:
    """Write records as JSONL or Parquet (by suffix); same records -> same bytes."""
    path = Path(path)
    fmt = _format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for r in records:
                d = _plain(r)
                d["images"] = [data_uri(v) if isinstance(v, bytes) else v for v in d["images"]]
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        return
    pq.write_table(_to_table([_plain(r) for r in records]), path)


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    inline = any(isinstance(v, bytes) for r in rows for v in r["images"])
    if inline:
        image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        images = [[{"bytes": v, "path": None} if isinstance(v, bytes) else {"bytes": None, "path": v}
                   for v in r["images"]] for r in rows]
    else:
        image_type, images = pa.list_(pa.string()), [r["images"] for r in rows]
    return pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "messages": pa.array([json.dumps(r["messages"], ensure_ascii=False) for r in rows], pa.string()),
        "images": pa.array(images, image_type),
        "answer": pa.array([r["answer"] for r in rows], pa.string()),
        "task": pa.array([r["task"] for r in rows], pa.string()),
        "family": pa.array([r["family"] for r in rows], pa.string()),
        "difficulty": pa.array([r["difficulty"] for r in rows], pa.int8()),
        "rewards": pa.array([r["rewards"] for r in rows], pa.list_(pa.string())),
        "meta": pa.array([json.dumps(r["meta"], ensure_ascii=False, sort_keys=True) for r in rows], pa.string()),
    })

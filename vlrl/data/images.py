"""Loading a record's images, and a map-style dataset that can skip bad ones.

A missing or corrupt image is a data problem the user fixes, so by default it
stops the run with the file, row and image named. A recipe may instead ask to
skip such rows; then the dataset returns None for them and remembers why, so
the trainer can count them in its metrics instead of silently training on less.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from vlrl.data.io import iter_records, location
from vlrl.data.records import Record
from vlrl.errors import DataError

# What Pillow raises for bytes that are not a decodable image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def _ref_bytes(ref: str | bytes, base_dir: Path, where: str, i: int) -> tuple[bytes, str]:
    if isinstance(ref, bytes):
        return ref, f"image {i} (inline bytes)"
    if ref.startswith("data:"):
        label = f"image {i} (inline data URI)"
        try:
            return base64.b64decode(ref.split(",", 1)[1], validate=True), label
        except (IndexError, binascii.Error) as e:
            raise DataError(f"{where}: {label} is not valid base64 ({e})") from None
    p = Path(ref)
    if not p.is_absolute():
        p = base_dir / p
    label = f"image '{ref}'"
    try:
        return p.read_bytes(), label
    except FileNotFoundError:
        raise DataError(f"{where}: {label} missing (no file {p})") from None
    except OSError as e:
        raise DataError(f"{where}: {label} cannot be read ({e.strerror or e})") from None


def load_images(record: Record, base_dir: Path, *, source: str, row: int) -> list[Image.Image]:
    """The record's images as RGB; relative paths resolve against base_dir (the data file's folder)."""
    where = location(source, row)
    out = []
    for i, ref in enumerate(record.images):
        data, label = _ref_bytes(ref, Path(base_dir), where, i)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                out.append(img.convert("RGB"))
        except _DECODE_ERRORS as e:
            raise DataError(f"{where}: {label} is not a readable image ({type(e).__name__}: {e})") from None
    return out


@dataclass
class Sample:
    record: Record
    images: list[Image.Image]  # RGB, one per image placeholder, in order
    row: int  # 1-based line (JSONL) or row (Parquet) in the source file


class RecordDataset:
    """Records of one file, with images decoded on access (torch `Dataset` protocol).

    on_bad_image="skip" returns None for a row whose image is missing or corrupt;
    `skip_reasons` maps each such row to its message and `skipped` counts distinct
    rows, so revisiting a row in a later epoch does not count it twice. With
    DataLoader workers each worker holds its own counts.
    """

    def __init__(self, path: Path, on_bad_image: Literal["error", "skip"] = "error") -> None:
        if on_bad_image not in ("error", "skip"):
            raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.path = Path(path)
        self.on_bad_image = on_bad_image
        self._rows = list(iter_records(self.path))
        # Built once: the RL controller reads `records[i]` for every group several times a
        # step, and a list rebuilt per read made each of those O(dataset) (13% of an RL
        # step's wall time over a 20,000-record prompt file).
        self._records = [r for _, r in self._rows]
        if not self._rows:
            # Caught here, where every stage reads its data: an empty train split otherwise
            # surfaces as a phase whose selection matches nothing, and an empty eval split
            # as an eval of 0 records that reports 0% and lets the stage complete.
            what = "only blank lines" if self.path.suffix == ".jsonl" and self.path.stat().st_size else "empty"
            raise DataError(f"file {self.path}: no records ({what}); expected at least one record")
        self.skip_reasons: dict[int, str] = {}

    @property
    def records(self) -> list[Record]:
        return self._records

    @property
    def skipped(self) -> int:
        return len(self.skip_reasons)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Sample | None:
        row, record = self._rows[i]
        try:
            images = load_images(record, self.path.parent, source=str(self.path), row=row)
        except DataError as e:
            if self.on_bad_image == "error":
                raise
            self.skip_reasons[row] = str(e)
            return None
        return Sample(record, images, row)


class RecordDatasets:
    """Several record files read as one list (the stage's data first), for stages whose
    phases draw from corpora of their own: index i is the i-th record of the concatenation,
    so samplers and the consumed-data tracker stay plain integer streams."""

    def __init__(self, parts: list[RecordDataset]) -> None:
        if not parts:
            raise DataError("no record files to read")
        self.parts = parts
        self._starts = [0]
        for d in parts:
            self._starts.append(self._starts[-1] + len(d))
        self._records = [r for d in parts for r in d.records]  # once, as RecordDataset's

    @property
    def path(self) -> Path:
        return self.parts[0].path

    @property
    def records(self) -> list[Record]:
        return self._records

    @property
    def skipped(self) -> int:
        return sum(d.skipped for d in self.parts)

    def span(self, path: Path) -> tuple[int, int]:
        """[start, stop) of that file's records in the concatenation."""
        for k, d in enumerate(self.parts):
            if d.path == Path(path):
                return self._starts[k], self._starts[k + 1]
        raise KeyError(path)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> Sample | None:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._starts, i) - 1
        return self.parts[k][i - self._starts[k]]

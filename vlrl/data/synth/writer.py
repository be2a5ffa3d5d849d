"""`make_dataset`: the synthetic world written out as train and held-out eval splits.

Determinism: each record draws from its own `random.Random` keyed by
(seed, split, index, attempt), so a record does not depend on how many others
came before it and the same seed gives byte-identical files. Which task and
difficulty each index gets is planned up front (exact proportions, then a seeded
shuffle), so every task x difficulty cell is represented even in small sets.

Held-out eval: eval records come from their own seed stream, and a candidate
whose (question, rendered pixels) already occurs in train (or earlier in eval)
is redrawn; cells too small to find a new item after `_MAX_REDRAWS` tries are
left out and counted in the manifest (`eval_unfilled`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from vlrl.data.io import write_records
from vlrl.data.records import ContentItem, Message, Record
from vlrl.data.synth.item import Item
from vlrl.data.synth.render import render, save_png
from vlrl.data.synth.tasks import DIFFICULTIES, FAMILIES, FAMILY_TASKS, TASKS
from vlrl.errors import VlrlError

VERSION = 1
DEFAULT_MIX: dict[str, float] = {"perception": 0.45, "reasoning": 0.35, "text": 0.2}
_MAX_REDRAWS = 64
_IMAGE_DIR = "images"


def _apportion(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to n, proportional to weights (largest remainder, ties by order)."""
    total = sum(weights.values())
    quotas = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(q) for k, q in quotas.items()}
    order = sorted(weights, key=lambda k: (-(quotas[k] - counts[k]), list(weights).index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def check_mix(families_mix: dict[str, float] | None) -> dict[str, float]:
    mix = dict(DEFAULT_MIX if families_mix is None else families_mix)
    for k, w in mix.items():
        if k not in FAMILIES:
            raise VlrlError(f"families_mix: unknown family {k!r}; expected some of {', '.join(FAMILIES)}")
        if not isinstance(w, (int, float)) or w < 0:
            raise VlrlError(f"families_mix.{k}: expected a weight >= 0, got {w!r}")
    if sum(mix.values()) <= 0:
        raise VlrlError("families_mix: at least one family needs a weight > 0")
    return {f: float(mix.get(f, 0.0)) for f in FAMILIES}


def plan(n: int, mix: dict[str, float], rng: random.Random) -> list[tuple[str, int]]:
    """(task, difficulty) per index: families by mix, tasks evenly, difficulties evenly."""
    slots: list[tuple[str, int]] = []
    for family, n_family in _apportion(n, mix).items():
        tasks = FAMILY_TASKS[family]
        for task, n_task in _apportion(n_family, {t: 1.0 for t in tasks}).items():
            # difficulties cycle across tasks too, so both per task and overall they differ by <= 1
            slots += [(task, DIFFICULTIES[(len(slots) + j) % len(DIFFICULTIES)]) for j in range(n_task)]
    rng.shuffle(slots)
    return slots


def item_rng(seed: int, split: str, index: int, attempt: int = 0) -> random.Random:
    return random.Random(f"vlrl-synth/{seed}/{split}/{index}/{attempt}")


def to_record(item: Item, rid: str, task: str, difficulty: int, image_path: str | None) -> Record:
    if image_path is not None:
        user = Message(role="user", content=[ContentItem(type="image"), ContentItem(type="text", text=item.question)])
        images = [image_path]
    else:
        user = Message(role="user", content=[ContentItem(type="text", text=item.question)])
        images = []
    return Record(
        id=rid,
        messages=[user, Message(role="assistant", content=item.target)],
        images=images,
        answer=item.answer,
        task=task,
        family=TASKS[task].family,  # type: ignore[arg-type]
        difficulty=difficulty,
        meta=item.meta,
    )


def _content_key(question: str, image: Image.Image | None) -> bytes:
    h = hashlib.sha1(question.encode())
    if image is not None:
        h.update(b"\0")
        h.update(image.tobytes())
    return h.digest()


def _generate(seed: int, split: str, slots: list[tuple[str, int]], seen: set[bytes],
              dedupe: bool, avoid: frozenset[bytes] = frozenset()) -> Iterator[tuple[Record, Image.Image | None]]:
    """Records with their images; with dedupe, skips contents already in `seen` (redrawing);
    contents in `avoid` (another dataset's held-out records) are always redrawn. A slot
    that finds nothing new in `_MAX_REDRAWS` tries is left out."""
    for index, (task, difficulty) in enumerate(slots):
        rid = f"{split}-{index:06d}"
        for attempt in range(_MAX_REDRAWS if dedupe or avoid else 1):
            item = TASKS[task].generate(item_rng(seed, split, index, attempt), difficulty)
            image = render(item.scene) if item.scene is not None else None
            key = _content_key(item.question, image)
            if (dedupe and key in seen) or key in avoid:
                continue
            seen.add(key)
            path = f"{_IMAGE_DIR}/{rid}.png" if image is not None else None
            yield to_record(item, rid, task, difficulty, path), image
            break


def counts(records: list[Record]) -> dict[str, Any]:
    by_td: dict[str, Counter] = {}
    for r in records:
        by_td.setdefault(r.task, Counter())[str(r.difficulty)] += 1
    return {
        "total": len(records),
        "family": dict(sorted(Counter(r.family for r in records).items())),
        "task": dict(sorted(Counter(r.task for r in records).items())),
        "difficulty": dict(sorted(Counter(str(r.difficulty) for r in records).items())),
        "task_difficulty": {t: dict(sorted(c.items())) for t, c in sorted(by_td.items())},
    }


def _clear_old_images(image_dir: Path) -> None:
    """Remove images an earlier run wrote here (ours by name only), so none go stale."""
    for split in ("train", "eval"):
        for p in image_dir.glob(f"{split}-*.png"):
            p.unlink()


def held_out_keys(data_dir: Path) -> frozenset[bytes]:
    """Content keys (question, pixels) of a dataset folder's eval split, so that a corpus
    generated beside it can leave those records out of its training split."""
    from vlrl.data.images import load_images
    from vlrl.data.io import load_records, split_path

    path = split_path(Path(data_dir), "eval")
    keys = set()
    for row, r in enumerate(load_records(path), start=1):
        user = next(m for m in r.messages if m.role == "user")
        question = user.content if isinstance(user.content, str) else "".join(c.text or "" for c in user.content if c.type == "text")
        images = load_images(r, path.parent, source=str(path), row=row)
        keys.add(_content_key(question, images[0] if images else None))
    return frozenset(keys)


def make_dataset(out_dir: Path, seed: int, n: int, n_eval: int | None = None,
                 families_mix: dict[str, float] | None = None, fmt: str = "jsonl",
                 exclude: frozenset[bytes] = frozenset()) -> dict[str, Any]:
    """Write train/eval records, their PNGs and manifest.json under out_dir; returns the manifest.

    n is the number of train records; n_eval defaults to max(50, n // 10) so every
    task x difficulty cell has at least one held-out item. `exclude` holds content keys
    (`held_out_keys`) that neither split may contain: another dataset's held-out records.
    """
    if fmt not in ("jsonl", "parquet"):
        raise VlrlError(f"format {fmt!r}: expected 'jsonl' or 'parquet'")
    if n < 0 or (n_eval is not None and n_eval < 0):
        raise VlrlError(f"record counts must be >= 0, got n={n}, n_eval={n_eval}")
    mix = check_mix(families_mix)
    n_eval = max(50, n // 10) if n_eval is None else n_eval
    out_dir = Path(out_dir)
    image_dir = out_dir / _IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    _clear_old_images(image_dir)

    seen: set[bytes] = set()
    splits: dict[str, list[Record]] = {}
    for split, size, dedupe in (("train", n, False), ("eval", n_eval, True)):
        slots = plan(size, mix, random.Random(f"vlrl-synth/{seed}/{split}/plan"))
        records = []
        for record, image in _generate(seed, split, slots, seen, dedupe, exclude):
            if image is not None:
                save_png(image, out_dir / record.images[0])
            records.append(record)
        write_records(out_dir / f"{split}.{fmt}", records)
        splits[split] = records

    manifest = {
        "generator": "vlrl.data.synth",
        "version": VERSION,
        "seed": seed,
        "format": fmt,
        "families_mix": mix,
        "files": {s: f"{s}.{fmt}" for s in splits},
        "image_dir": _IMAGE_DIR,
        "counts": {s: counts(rs) for s, rs in splits.items()},
        "eval_unfilled": n_eval - len(splits["eval"]),
    }
    if exclude:
        manifest["excluded_keys"] = len(exclude)
        manifest["train_unfilled"] = n - len(splits["train"])
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest

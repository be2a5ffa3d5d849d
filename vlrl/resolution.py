"""Test-time resolution search (MindVL): evaluate one checkpoint over a grid of
image-processor pixel bounds and report, per task family, the best setting and
how much the choice matters (the spread between best and worst).

Bounds are given in image tokens: one token is (patch_size x merge_size)^2 pixels
(28 x 28 for Qwen2.5-VL), so `min_tokens=16` means min_pixels = 16 x 28 x 28.

Grids: `mindvl` is the paper's (min {4,16,32,64}, max {1280,2048,2560,3072,4096,8192}
tokens) for real checkpoints. `tiny` scales it to the tiny model, whose processor
keeps the 112x112 synthetic images at 16 tokens: min {4,9,16,25} x max {9,16,25,36},
so the search shrinks images to 9 tokens, keeps them at 16 or enlarges them to 25.
Departure from MindVL: settings that resize every eval image identically are
evaluated once and share the result (the paper evaluates each grid point).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from rich.table import Table
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from vlrl.errors import VlrlError
from vlrl.report_cells import JsonReport


@dataclass(frozen=True)
class Grid:
    min_tokens: tuple[int, ...]
    max_tokens: tuple[int, ...]

    def settings(self) -> list[tuple[int, int]]:
        """(min_tokens, max_tokens) pairs with min <= max."""
        return [(a, b) for a in self.min_tokens for b in self.max_tokens if a <= b]


GRIDS = {
    "mindvl": Grid((4, 16, 32, 64), (1280, 2048, 2560, 3072, 4096, 8192)),
    "tiny": Grid((4, 9, 16, 25), (9, 16, 25, 36)),
}


def parse_grid(text: str) -> Grid:
    """A grid name (mindvl, tiny) or 'MIN,MIN,...:MAX,MAX,...' in image tokens."""
    if text in GRIDS:
        return GRIDS[text]
    try:
        lo, hi = text.split(":")
        grid = Grid(tuple(int(x) for x in lo.split(",")), tuple(int(x) for x in hi.split(",")))
    except ValueError:
        raise VlrlError(f"--resolutions {text!r}: expected a grid name ({', '.join(GRIDS)}) or MIN,...:MAX,... in image tokens (e.g. 4,16:16,36)") from None
    if not grid.settings() or min(grid.min_tokens + grid.max_tokens) < 1:
        raise VlrlError(f"--resolutions {text!r}: no setting with 1 <= min_tokens <= max_tokens")
    return grid


def token_pixels(processor) -> int:
    ip = processor.image_processor
    return (ip.patch_size * ip.merge_size) ** 2


def with_bounds(processor, min_pixels: int, max_pixels: int):
    """A copy of the processor whose image processor resizes within these bounds."""
    proc = copy.deepcopy(processor)
    ip = proc.image_processor
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(ip, name):
            setattr(ip, name, value)
    return proc


def with_pixel_bounds(processor, min_pixels: int | None, max_pixels: int | None):
    """`with_bounds` where a bound left None keeps the processor's own; a pair that
    crosses (min above max) is refused rather than silently swapped."""
    size = processor.image_processor.size
    lo = size["shortest_edge"] if min_pixels is None else min_pixels
    hi = size["longest_edge"] if max_pixels is None else max_pixels
    if lo > hi:
        raise VlrlError(f"min_pixels {lo:,} is above max_pixels {hi:,} (one of them is the checkpoint processor's own)")
    return with_bounds(processor, lo, hi)


def bounded_checkpoint(src: Path, dst: Path, min_pixels: int | None, max_pixels: int | None) -> Path:
    """A checkpoint folder that is `src` with its processor's pixel bounds replaced: the
    processor is written into `dst`, every other file of `src` is linked beside it. Why a
    folder and not a processor object: every worker of a stage (trainer, reference,
    rollout engines, vLLM among them, which reads the processor from the model folder)
    loads from a path, so one folder gives them all the same bounds."""
    import os
    import shutil

    from vlrl.model.loading import load_processor

    src, dst = Path(src).resolve(), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with_pixel_bounds(load_processor(src), min_pixels, max_pixels).save_pretrained(tmp)
    for f in src.iterdir():  # after the processor: its files are written, never linked
        if f.is_file() and not (tmp / f.name).exists():
            os.symlink(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


def resized_shapes(sizes: list[tuple[int, int]], processor, min_pixels: int, max_pixels: int) -> tuple[tuple[int, int], ...]:
    """Where each (height, width) lands under these bounds: settings that agree on all of
    them give identical inputs."""
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    return tuple(smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels) for h, w in sizes)


class SettingResult(BaseModel):
    min_tokens: int
    max_tokens: int
    min_pixels: int
    max_pixels: int
    image_tokens: float  # mean image tokens per image under this setting
    accuracy: float
    by_family: dict[str, float]
    shared_with: str | None = None  # the setting whose eval this one reuses


class FamilyBest(BaseModel):
    family: str
    best: str  # "min_tokens-max_tokens"
    accuracy: float
    worst: float
    spread: float  # best - worst accuracy over the grid


class ResolutionReport(JsonReport):
    model: str
    data: str
    n: int
    settings: list[SettingResult]
    best: list[FamilyBest]


def _label(s: SettingResult) -> str:
    return f"{s.min_tokens}-{s.max_tokens}"


def best_per_family(settings: list[SettingResult]) -> list[FamilyBest]:
    """Per family (and 'all'), the setting with the highest accuracy (ties: fewer image
    tokens, then grid order) and the spread over the grid."""
    fams = sorted({f for s in settings for f in s.by_family})
    out = []
    for fam in [*fams, "all"]:
        acc = [(s.accuracy if fam == "all" else s.by_family.get(fam, 0.0), s) for s in settings]
        top = max(acc, key=lambda x: (x[0], -x[1].image_tokens))
        worst = min(a for a, _ in acc)
        out.append(FamilyBest(family=fam, best=_label(top[1]), accuracy=top[0], worst=worst, spread=top[0] - worst))
    return out


def resolution_search(
    model: str | Path,
    data: str | Path,
    *,
    grid: Grid,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    limit: int | None = None,
    device: str = "cpu",
    on_bad_image: Literal["error", "skip"] = "error",
) -> ResolutionReport:
    from vlrl.eval import evaluate, load_eval_samples
    from vlrl.model.loading import load_model, load_processor

    net, processor = load_model(model, device=device, trainable=False), load_processor(model)
    samples, _ = load_eval_samples(Path(data), limit=limit, on_bad_image=on_bad_image)
    sizes = [(im.height, im.width) for s in samples for im in s.images]
    unit = token_pixels(processor)
    done: dict[tuple, SettingResult] = {}
    results = []
    for lo, hi in grid.settings():
        shapes = resized_shapes(sizes, processor, lo * unit, hi * unit)
        tokens = sum(h * w for h, w in shapes) / unit / len(shapes) if shapes else 0.0
        base = dict(min_tokens=lo, max_tokens=hi, min_pixels=lo * unit, max_pixels=hi * unit, image_tokens=tokens)
        if shapes in done:
            prev = done[shapes]
            results.append(SettingResult(**base, accuracy=prev.accuracy, by_family=prev.by_family, shared_with=_label(prev)))
            continue
        report = evaluate((net, with_bounds(processor, lo * unit, hi * unit)), samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
        res = SettingResult(**base, accuracy=report.accuracy, by_family=report.by_family)
        done[shapes] = res
        results.append(res)
    return ResolutionReport(model=str(model), data=str(data), n=len(samples), settings=results, best=best_per_family(results))


def render_resolution_table(report: ResolutionReport) -> Table:
    fams = sorted({f for s in report.settings for f in s.by_family})
    table = Table(title=f"resolution search: {report.model} on {report.data} ({report.n} records)")
    for col in ("min-max tokens", "img tokens", "all %", *(f"{f} %" for f in fams)):
        table.add_column(col, justify="right")
    for s in report.settings:
        note = f" (= {s.shared_with})" if s.shared_with else ""
        table.add_row(_label(s) + note, f"{s.image_tokens:.1f}", f"{100 * s.accuracy:.1f}", *(f"{100 * s.by_family.get(f, 0):.1f}" for f in fams))
    table.caption = "best per family: " + "; ".join(f"{b.family} {b.best} ({100 * b.accuracy:.1f}%, spread {100 * b.spread:.1f})" for b in report.best)
    return table

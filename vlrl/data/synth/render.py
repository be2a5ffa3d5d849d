"""Scenes and their rendering to 112x112 RGB images.

Tasks describe an image as a `Scene` (plain data) and only this module draws it,
so a record's content can be generated, checked and hashed without Pillow, and
rendering stays one deterministic function of the scene: Pillow's bundled
scalable font (`ImageFont.load_default(size=...)`, no system fonts) and noise
from a seeded numpy generator. Same scene -> same pixels -> same PNG bytes.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlrl.data.synth.vocab import COLORS, IMAGE_SIZE

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, inclusive


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    color: str  # a COLORS name
    box: Box  # the shape's tight bounding box


@dataclass(frozen=True)
class Text:
    text: str
    xy: tuple[int, int]  # top-left of the ink, not of the font's line box
    size: int  # font size in px
    fill: tuple[int, int, int]


@dataclass
class Scene:
    background: tuple[int, int, int] = (255, 255, 255)
    items: list[Shape | Text] = field(default_factory=list)
    noise: float = 0.0  # std of per-pixel Gaussian grey noise, in 0-255 units
    noise_seed: int = 0


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int) -> tuple[int, int]:
    """Width and height of the ink of `text` at `size` (what `Text.xy` positions)."""
    x1, y1, x2, y2 = font(size).getbbox(text)
    return x2 - x1, y2 - y1


def fitting_size(text: str, size: int, max_width: int) -> int:
    """The largest font size <= size whose ink fits in max_width."""
    while size > 8 and text_size(text, size)[0] > max_width:
        size -= 1
    return size


def place_text(rng: random.Random, text: str, size: int, fill: tuple[int, int, int],
               region: Box = (4, 4, IMAGE_SIZE - 5, IMAGE_SIZE - 5)) -> Text:
    """A Text at a random spot inside region (shrinking the font if it cannot fit)."""
    rx1, ry1, rx2, ry2 = region
    size = fitting_size(text, size, rx2 - rx1)
    w, h = text_size(text, size)
    x = rng.randint(rx1, max(rx1, rx2 - w))
    y = rng.randint(ry1, max(ry1, ry2 - h))
    return Text(text, (x, y), size, fill)


def grid_boxes(rng: random.Random, n: int, grid: int, size_range: tuple[int, int],
               cells: list[int] | None = None, margin: int = 2) -> list[tuple[int, Box]]:
    """n non-overlapping square boxes, one per distinct cell of a grid x grid layout.

    Returns (cell index, box) pairs; cell index = row * grid + col. `cells` fixes
    which cells to use (e.g. a position task's answer cell).
    """
    cell = IMAGE_SIZE / grid
    chosen = cells if cells is not None else rng.sample(range(grid * grid), n)
    out = []
    for c in chosen:
        r, col = divmod(c, grid)
        cx1, cy1 = int(col * cell) + margin, int(r * cell) + margin
        cx2, cy2 = int((col + 1) * cell) - 1 - margin, int((r + 1) * cell) - 1 - margin
        s = min(rng.randint(*size_range), cx2 - cx1, cy2 - cy1)
        x = rng.randint(cx1, cx2 - s)
        y = rng.randint(cy1, cy2 - s)
        out.append((c, (x, y, x + s, y + s)))
    return out


def background(rng: random.Random, difficulty: int) -> tuple[int, int, int]:
    """White for easy levels, an increasingly tinted light colour for hard ones."""
    if difficulty <= 2:
        return (255, 255, 255)
    spread = {3: 15, 4: 35, 5: 55}[difficulty]
    return tuple(255 - rng.randint(0, spread) for _ in range(3))  # type: ignore[return-value]


def noise_level(difficulty: int) -> float:
    return {1: 0.0, 2: 0.0, 3: 6.0, 4: 12.0, 5: 20.0}[difficulty]


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for item in scene.items:
        if isinstance(item, Shape):
            _draw_shape(draw, item)
        else:
            f = font(item.size)
            ox, oy = f.getbbox(item.text)[:2]  # align ink (not line box) to xy
            draw.text((item.xy[0] - ox, item.xy[1] - oy), item.text, font=f, fill=item.fill)
    if scene.noise > 0:
        arr = np.asarray(img, dtype=np.float32)
        grain = np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, (IMAGE_SIZE, IMAGE_SIZE, 1))
        arr += grain.astype(np.float32)  # same on every channel: grain, not colour speckle
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    rgb = COLORS[s.color]
    x1, y1, x2, y2 = s.box
    if s.kind == "circle":
        draw.ellipse(s.box, fill=rgb)
    elif s.kind == "square":
        draw.rectangle(s.box, fill=rgb)
    elif s.kind == "triangle":
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape kind {s.kind!r}")


# zlib level 1: on these noisy images it is both the fastest and the smallest PNG.
_PNG_LEVEL = 1


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=_PNG_LEVEL)
    return buf.getvalue()


def save_png(img: Image.Image, path) -> None:
    img.save(path, format="PNG", compress_level=_PNG_LEVEL)

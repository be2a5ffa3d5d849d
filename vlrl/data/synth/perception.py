"""Perception tasks: read what the image shows; the target is just the box.

Difficulty makes the same question harder to see, never harder to reason about:
more glyphs in smaller fonts, more and smaller shapes, distractors that share a
colour or a shape with the target (and, at level 5, near colours such as red vs
orange), tinted backgrounds and pixel noise.
"""

from __future__ import annotations

import random

from vlrl.data.synth.item import Item, boxed
from vlrl.data.synth.render import Box, Scene, Shape, background, grid_boxes, noise_level, place_text
from vlrl.data.synth.vocab import (
    COLOR_NAMES,
    IMAGE_SIZE,
    INK,
    POSITIONS,
    SHAPE_PLURALS,
    SHAPES,
    SIMILAR_COLORS,
    WORDS_BY_LENGTH,
)

_BLACK = INK["black"]


def _ink(rng: random.Random, difficulty: int) -> tuple[int, int, int]:
    return _BLACK if difficulty <= 3 else rng.choice(list(INK.values()))


def _scene(rng: random.Random, difficulty: int, items: list) -> Scene:
    return Scene(background(rng, difficulty), items, noise_level(difficulty), rng.getrandbits(32))


def read_digits(rng: random.Random, difficulty: int) -> Item:
    (lo, hi), size = {1: ((1, 2), 44), 2: ((3, 3), 38), 3: ((4, 4), 32), 4: ((5, 5), 26), 5: ((6, 6), 22)}[difficulty]
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))
    scene = _scene(rng, difficulty, [place_text(rng, digits, size, _ink(rng, difficulty))])
    return Item("Read the digits in the image.", boxed(digits), digits, {"digits": digits}, scene)


def read_word(rng: random.Random, difficulty: int) -> Item:
    lengths, size = {1: ((3,), 40), 2: ((4,), 36), 3: ((5,), 30), 4: ((6, 7), 26), 5: ((7, 8), 22)}[difficulty]
    word = rng.choice(WORDS_BY_LENGTH[rng.choice(lengths)])
    shown = word.upper() if difficulty >= 4 and rng.random() < 0.5 else word
    scene = _scene(rng, difficulty, [place_text(rng, shown, size, _ink(rng, difficulty))])
    return Item("What word is written in the image?", boxed(word), word, {"word": word, "shown": shown}, scene)


def _other_color(rng: random.Random, color: str, similar: bool) -> str:
    if similar and rng.random() < 0.6:
        return rng.choice(SIMILAR_COLORS[color])
    return rng.choice([c for c in COLOR_NAMES if c != color])


def _distractor(rng: random.Random, color: str, kind: str, similar: bool) -> tuple[str, str]:
    """A (color, kind) that differs from the target in at least one attribute;
    at hard levels it usually shares the other one, so both must be checked."""
    roll = rng.random()
    if not similar or roll < 0.2:
        other = (rng.choice(COLOR_NAMES), rng.choice(SHAPES))
        return other if other != (color, kind) else (_other_color(rng, color, False), kind)
    if roll < 0.6:
        return _other_color(rng, color, True), kind
    return color, rng.choice([s for s in SHAPES if s != kind])


def _shapes(objs: list[tuple[str, str]], boxes: list[tuple[int, Box]]) -> list[Shape]:
    return [Shape(kind, color, box) for (color, kind), (_, box) in zip(objs, boxes)]


def count_shapes(rng: random.Random, difficulty: int) -> Item:
    grid, size_range, (klo, khi), (mlo, mhi) = {
        1: (3, (22, 30), (1, 3), (0, 0)),
        2: (3, (20, 28), (1, 4), (1, 2)),
        3: (4, (16, 22), (0, 5), (2, 4)),
        4: (4, (15, 21), (0, 5), (3, 6)),
        5: (5, (12, 17), (0, 7), (4, 8)),
    }[difficulty]
    color = rng.choice(COLOR_NAMES)
    kind = rng.choice(SHAPES) if difficulty >= 4 else None  # levels 4-5 ask for colour AND shape
    k, m = rng.randint(klo, khi), rng.randint(mlo, mhi)
    objs = [(color, kind or rng.choice(SHAPES)) for _ in range(k)]
    for _ in range(m):
        if kind is None:
            objs.append((_other_color(rng, color, difficulty >= 5), rng.choice(SHAPES)))
        else:
            objs.append(_distractor(rng, color, kind, similar=True))
    rng.shuffle(objs)
    boxes = grid_boxes(rng, len(objs), grid, size_range)
    scene = _scene(rng, difficulty, _shapes(objs, boxes))
    noun = SHAPE_PLURALS[kind] if kind else "shapes"
    answer = str(k)
    meta = {"color": color, "kind": kind, "count": k, "n_shapes": len(objs)}
    return Item(f"How many {color} {noun} are there?", boxed(answer), answer, meta, scene)


def _unique_target_scene(rng: random.Random, difficulty: int, n: int, grid: int, size_range: tuple[int, int],
                         by: str, similar: bool) -> tuple[tuple[str, str], int, Box, list[Shape]]:
    """n shapes where the first is the only one matching the query `by`
    ("kind": its shape; "color_kind": colour and shape; "cell": its grid cell)."""
    color, kind = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
    objs = [(color, kind)]
    if by == "kind":
        kinds = rng.sample([s for s in SHAPES if s != kind], min(n - 1, len(SHAPES) - 1))
        colors = rng.sample([c for c in COLOR_NAMES if c != color], len(kinds))
        objs += list(zip(colors, kinds))
    else:
        for _ in range(n - 1):
            objs.append(_distractor(rng, color, kind, similar) if by == "color_kind"
                        else (_other_color(rng, color, similar), rng.choice(SHAPES)))
    boxes = grid_boxes(rng, len(objs), grid, size_range)
    cell, box = boxes[0]
    return (color, kind), cell, box, _shapes(objs, boxes)


def shape_color(rng: random.Random, difficulty: int) -> Item:
    n_lo, n_hi, grid, size_range, by = {
        1: (1, 1, 1, (36, 60), "kind"),
        2: (2, 2, 2, (26, 44), "kind"),
        3: (3, 3, 3, (20, 30), "kind"),
        4: (3, 5, 3, (18, 28), "cell"),
        5: (5, 7, 3, (14, 22), "cell"),
    }[difficulty]
    (color, kind), cell, _, shapes = _unique_target_scene(
        rng, difficulty, rng.randint(n_lo, n_hi), grid, size_range, by, similar=difficulty >= 5)
    scene = _scene(rng, difficulty, shapes)
    where = f"the {kind}" if by == "kind" else f"the shape in the {POSITIONS[cell]}"
    meta = {"kind": kind, "position": POSITIONS[cell] if grid == 3 else None, "n_shapes": len(shapes)}
    return Item(f"What color is {where}?", boxed(color), color, meta, scene)


def shape_position(rng: random.Random, difficulty: int) -> Item:
    n_lo, n_hi, size_range, by = {
        1: (1, 1, (20, 30), "kind"),
        2: (2, 2, (20, 30), "kind"),
        3: (3, 4, (18, 28), "color_kind"),
        4: (4, 6, (14, 26), "color_kind"),
        5: (6, 8, (12, 22), "color_kind"),
    }[difficulty]
    (color, kind), cell, _, shapes = _unique_target_scene(
        rng, difficulty, rng.randint(n_lo, n_hi), 3, size_range, by, similar=difficulty >= 4)
    scene = _scene(rng, difficulty, shapes)
    name = kind if by == "kind" else f"{color} {kind}"
    answer = POSITIONS[cell]
    return Item(f"Where is the {name}?", boxed(answer), answer,
                {"color": color, "kind": kind, "n_shapes": len(shapes)}, scene)


def box_to_units(box: Box) -> list[int]:
    """Pixel box (inclusive) -> 0-100 units, the coordinate system bbox answers use."""
    x1, y1, x2, y2 = box
    s = 100 / IMAGE_SIZE
    return [round(x1 * s), round(y1 * s), round((x2 + 1) * s), round((y2 + 1) * s)]


def format_box(units: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in units) + "]"


def bbox(rng: random.Random, difficulty: int) -> Item:
    n_lo, n_hi, grid, size_range, by = {
        1: (1, 1, 1, (30, 56), "kind"),
        2: (2, 2, 2, (24, 44), "kind"),
        3: (3, 3, 3, (18, 32), "color_kind"),
        4: (4, 5, 3, (14, 28), "color_kind"),
        5: (5, 7, 4, (10, 24), "color_kind"),
    }[difficulty]
    (color, kind), _, box, shapes = _unique_target_scene(
        rng, difficulty, rng.randint(n_lo, n_hi), grid, size_range, by, similar=difficulty >= 4)
    scene = _scene(rng, difficulty, shapes)
    name = kind if by == "kind" else f"{color} {kind}"
    answer = format_box(box_to_units(box))
    question = f"Give the bounding box of the {name} as [x1, y1, x2, y2] on a 0 to 100 scale."
    return Item(question, boxed(answer), answer,
                {"color": color, "kind": kind, "box_px": list(box), "n_shapes": len(shapes)}, scene)

"""Plain texts for training the tiny tokenizer (and, if wanted, text-only LM warm-up).

A fixed glossary comes first so that every word, name and number format of the
world is in the corpus even when n is small; then n question + target texts
drawn like a train split (no images are rendered).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from vlrl.data.synth.tasks import TASKS
from vlrl.data.synth.vocab import (
    ALL_WORDS,
    COLOR_NAMES,
    MARBLE_COLORS,
    NAMES,
    POSITIONS,
    SHAPE_PLURALS,
    SHAPES,
    SHOP_ITEMS,
    SHOP_PLURALS,
    VARIABLES,
)
from vlrl.data.synth.writer import DEFAULT_MIX, item_rng, plan


def glossary_texts() -> list[str]:
    return [
        "Colors: " + ", ".join(COLOR_NAMES) + ".",
        "Shapes: " + ", ".join(SHAPES) + "; " + ", ".join(SHAPE_PLURALS.values()) + ".",
        "Positions: " + ", ".join(POSITIONS) + ".",
        "Words: " + " ".join(ALL_WORDS) + ".",
        "WORDS: " + " ".join(w.upper() for w in ALL_WORDS) + ".",
        "Names: " + ", ".join(n for n, _ in NAMES) + "; he, she, He, She.",
        "Shop: " + ", ".join(SHOP_ITEMS) + "; " + ", ".join(SHOP_PLURALS.values()) + ".",
        "Marbles: " + ", ".join(f"{c} {i}" for i, c in enumerate(MARBLE_COLORS, start=1)) + ".",
        "Variables: " + ", ".join(f"{v} = {i}" for i, v in enumerate(VARIABLES, start=7)) + ".",
        "Numbers: " + " ".join(str(i) for i in range(0, 101)) + " 200 500 1000.",
        "Math: 1 + 2 = 3. 5 - 3 = 2. 4 * 6 = 24. 8 / 2 = 4. (1 + 2) * 3 = 9. \\boxed{9} \\boxed{[10, 20, 30, 40]}",
        "Letters: " + " ".join("abcdefghijklmnopqrstuvwxyz") + " " + " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    ]


def corpus_texts(seed: int, n: int) -> Iterator[str]:
    """The glossary, then n texts "question\\ntarget" across all tasks and difficulties."""
    yield from glossary_texts()
    slots = plan(n, DEFAULT_MIX, random.Random(f"vlrl-synth/{seed}/corpus/plan"))
    for index, (task, difficulty) in enumerate(slots):
        item = TASKS[task].generate(item_rng(seed, "corpus", index), difficulty)
        yield f"{item.question}\n{item.target}"

"""The closed vocabulary of the synthetic world.

Every name a question or answer can use lives here, so the tiny tokenizer can be
trained on a corpus that is guaranteed to cover it (`corpus.glossary_texts`) and
so tasks agree on spellings ("color", "middle center"). The lists are short on
purpose: a 2-5 M parameter model trained for minutes learns a small regular world.
"""

from __future__ import annotations

IMAGE_SIZE = 112  # px; 8x8 patches of 14 px -> 16 merged tokens in the tiny ViT

# Saturated colours far apart in RGB; red/orange/yellow are the near pairs that
# the hardest levels lean on.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIMILAR_COLORS: dict[str, tuple[str, ...]] = {
    "red": ("orange", "purple"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "green"),
    "green": ("yellow", "blue"),
    "blue": ("purple", "green"),
    "purple": ("blue", "red"),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
SHAPE_SIDES: dict[str, int] = {"triangle": 3, "square": 4}

ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
POSITIONS: tuple[str, ...] = tuple(f"{r} {c}" for r in ROWS for c in COLS)

# Text colours for glyphs: dark enough to read on every background used.
INK: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "navy": (20, 30, 110),
    "maroon": (110, 20, 25),
    "darkgreen": (20, 85, 30),
}

# Words to read, by length; the lengths drive read_word's difficulty.
WORDS_BY_LENGTH: dict[int, tuple[str, ...]] = {
    3: ("cat", "dog", "sun", "box", "cup", "hat", "pen", "red", "car", "bus", "egg", "map", "key", "bed", "fox", "owl"),
    4: ("fish", "bird", "star", "moon", "tree", "book", "lamp", "ship", "cake", "ball", "door", "rain", "blue", "frog", "kite", "milk"),
    5: ("apple", "house", "chair", "table", "green", "water", "bread", "clock", "horse", "plant", "train", "river", "stone", "light", "shape", "happy"),
    6: ("orange", "purple", "yellow", "square", "circle", "garden", "rabbit", "pencil", "window", "basket", "bottle", "number"),
    7: ("picture", "kitchen", "rainbow", "monster", "chicken", "blanket", "library", "teacher", "morning", "diamond", "octopus", "penguin"),
    8: ("triangle", "elephant", "mountain", "umbrella", "dinosaur", "sandwich", "computer", "calendar", "football", "sunshine"),
}
ALL_WORDS: tuple[str, ...] = tuple(w for ws in WORDS_BY_LENGTH.values() for w in ws)

# Word problems: people, shop items (short names so a price list fits 112 px).
NAMES: tuple[tuple[str, str], ...] = (
    ("Ann", "she"), ("Mia", "she"), ("Eva", "she"), ("Zoe", "she"),
    ("Tom", "he"), ("Sam", "he"), ("Ben", "he"), ("Leo", "he"),
)
SHOP_ITEMS: tuple[str, ...] = ("pen", "cup", "hat", "book", "ball", "cake", "kite", "lamp")
SHOP_PLURALS: dict[str, str] = {w: w + "s" for w in SHOP_ITEMS}
MARBLE_COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "orange")

# Colour mixing facts (paint): used by text_fact.
COLOR_MIX: dict[tuple[str, str], str] = {
    ("red", "yellow"): "orange",
    ("blue", "yellow"): "green",
    ("blue", "red"): "purple",
}

# Variable names the arithmetic images use, top to bottom.
VARIABLES: tuple[str, ...] = ("a", "b", "c", "d")

"""Text-only tasks: the language side of the world, with no image.

They keep the language model able to read questions and write answers (the
"restore general capability" half of curriculum SFT), and they use the same
words and number formats as the image tasks so the tokenizer and LM see them
without pixels: arithmetic written out, and templated facts about the world's
colours, shapes, words and number sequences.
"""

from __future__ import annotations

import random

from vlrl.data.synth.item import Item, boxed, worked
from vlrl.data.synth.reasoning import apply
from vlrl.data.synth.vocab import ALL_WORDS, COLOR_MIX, SHAPE_SIDES, WORDS_BY_LENGTH

_MAX_FACTOR = 12
_MAX_VALUE = 1000

# --- text_arith ------------------------------------------------------------

_TEXT_ARITH = {1: (1, (1, 20)), 2: (1, (2, 99)), 3: (2, (2, 20)), 4: (2, (2, 99)), 5: (3, (10, 99))}


def _chain_op(rng: random.Random, cur: int, difficulty: int, hi: int) -> tuple[str, int]:
    ops = ["+", "-"] + (["*"] if difficulty >= 2 else []) + (["/"] if difficulty >= 4 else [])
    op = rng.choice(ops)
    if op == "*" and 2 * cur < _MAX_VALUE:  # one factor within times tables, product < 1000
        return op, rng.randint(2, min(_MAX_FACTOR if cur > _MAX_FACTOR else hi, (_MAX_VALUE - 1) // max(cur, 1)))
    if op == "*":
        op = "+"
    if op == "/":
        divisors = [k for k in range(2, 13) if cur % k == 0 and cur > 0]
        if divisors:
            return op, rng.choice(divisors)
        op = "+"
    y = rng.randint(1, hi)
    if op == "-" and y > cur:
        return "+", y
    return op, y


def text_arith(rng: random.Random, difficulty: int) -> Item:
    n_ops, (lo, hi) = _TEXT_ARITH[difficulty]
    if difficulty in (3, 4) and rng.random() < 0.35:
        return _precedence(rng, difficulty, hi)
    cur = rng.randint(lo, hi)
    expr, additive, steps, chain = str(cur), False, [], [cur]
    for _ in range(n_ops):
        op, y = _chain_op(rng, cur, difficulty, hi)
        if op in "*/" and additive:
            expr = f"({expr})"
        expr = f"{expr} {op} {y}"
        additive = op in "+-"
        new = apply(op, cur, y)
        steps.append(f"{cur} {op} {y} = {new}.")
        chain.append([op, y])
        cur = new
    answer = str(cur)
    return Item(f"What is {expr}?", worked(steps, answer), answer, {"expr": expr, "chain": chain})


def _precedence(rng: random.Random, difficulty: int, hi: int) -> Item:
    """a +/- b * c: the product comes first, which the left-to-right chains never need."""
    b, c = rng.randint(2, _MAX_FACTOR), rng.randint(2, _MAX_FACTOR)
    a = rng.randint(1, hi) + (b * c if rng.random() < 0.5 else 0)
    op = "-" if a >= b * c and rng.random() < 0.5 else "+"
    p, ans = b * c, apply(op, a, b * c)
    expr = f"{a} {op} {b} * {c}"
    steps = [f"{b} * {c} = {p}.", f"{a} {op} {p} = {ans}."]
    return Item(f"What is {expr}?", worked(steps, str(ans)), str(ans), {"expr": expr, "form": "precedence"})


# --- text_fact ------------------------------------------------------------

def _fact(q: str, a: str, kind: str, target: str | None = None, **meta) -> Item:
    return Item(q, target or boxed(a), a, {"fact": kind, **meta})


def _sequence(rng: random.Random, difficulty: int) -> Item:
    if difficulty == 5:
        start, k = rng.randint(1, 9), rng.choice((2, 3))
        seq = [start * k**i for i in range(4)]
        nxt = seq[-1] * k
        target = worked([f"Each number is multiplied by {k}.", f"{seq[-1]} * {k} = {nxt}."], str(nxt))
    else:
        k = rng.randint(1, 5) if difficulty == 3 else rng.randint(6, 12)
        down = difficulty == 4 and rng.random() < 0.5
        if down:
            start = rng.randint(3 * k + 1, 3 * k + 60)
            seq = [start - k * i for i in range(4)]
            nxt = seq[-1] - k
            steps = [f"Each number goes down by {k}.", f"{seq[-1]} - {k} = {nxt}."]
        else:
            start = rng.randint(0, 30)
            seq = [start + k * i for i in range(4)]
            nxt = seq[-1] + k
            steps = [f"Each number goes up by {k}.", f"{seq[-1]} + {k} = {nxt}."]
        target = worked(steps, str(nxt))
    q = "What number comes next: " + ", ".join(str(v) for v in seq) + "?"
    return _fact(q, str(nxt), "sequence", target, sequence=seq)


def _backwards(rng: random.Random, lengths: tuple[int, ...]) -> Item:
    w = rng.choice(WORDS_BY_LENGTH[rng.choice(lengths)])
    return _fact(f"Write the word {w} backwards.", w[::-1], "backwards", word=w)


def text_fact(rng: random.Random, difficulty: int) -> Item:
    w = rng.choice(ALL_WORDS)
    kind = rng.randrange(4)
    if difficulty == 1:
        if kind == 0:
            shape = rng.choice(sorted(SHAPE_SIDES))
            return _fact(f"How many sides does a {shape} have?", str(SHAPE_SIDES[shape]), "sides")
        if kind == 1:
            (x, y), mixed = rng.choice(sorted(COLOR_MIX.items()))
            x, y = (x, y) if rng.random() < 0.5 else (y, x)
            return _fact(f"What color do you get when you mix {x} and {y}?", mixed, "mix")
        if kind == 2:
            return _fact(f"What is the first letter of the word {w}?", w[0], "first_letter", word=w)
        n = rng.randint(0, 99)
        return _fact(f"What number comes after {n}?", str(n + 1), "after")
    if difficulty == 2:
        if kind == 0:
            return _fact(f"How many letters are in the word {w}?", str(len(w)), "length", word=w)
        if kind == 1:
            n = rng.randint(1, 100)
            return _fact(f"What number comes before {n}?", str(n - 1), "before")
        if kind == 2:
            a, b = rng.sample(range(1, 100), 2)
            return _fact(f"Which is larger, {a} or {b}?", str(max(a, b)), "larger")
        return _fact(f"What is the last letter of the word {w}?", w[-1], "last_letter", word=w)
    if difficulty == 3:
        if kind in (0, 1):
            return _sequence(rng, 3)
        if kind == 2:
            nums = rng.sample(range(1, 100), 3)
            return _fact("Which is the smallest: " + ", ".join(map(str, nums)) + "?", str(min(nums)), "smallest")
        return _backwards(rng, (3, 4))
    if difficulty == 4:
        if kind in (0, 1):
            return _sequence(rng, 4)
        if kind == 2:
            letter = rng.choice(sorted(set(w)))
            return _fact(f"How many times does the letter {letter} appear in the word {w}?",
                         str(w.count(letter)), "letter_count", word=w)
        return _backwards(rng, (5, 6))
    if kind in (0, 1):
        return _sequence(rng, 5)
    if kind == 2:
        nums = rng.sample(range(1, 100), 3)
        return _fact("Sort " + ", ".join(map(str, nums)) + " from smallest to largest.",
                     ", ".join(map(str, sorted(nums))), "sort")
    return _backwards(rng, (7, 8))

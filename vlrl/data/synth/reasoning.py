"""Reasoning tasks: numbers appear only in the image, the text says what to compute.

The target shows each step as "x op y = z" with the values read from the image,
then the box. Difficulty adds steps and digits (level 1: one operation on two
one-digit numbers; level 5: three operations on four two-digit numbers shown
in shuffled rows, or rows the question does not use), which is where a
small model that has had SFT still fails often enough for RL to improve it.
"""

from __future__ import annotations

import random

from vlrl.data.synth.item import Item, worked
from vlrl.data.synth.render import Scene, Shape, Text, background, noise_level, text_size
from vlrl.data.synth.vocab import (
    IMAGE_SIZE,
    INK,
    MARBLE_COLORS,
    NAMES,
    SHOP_ITEMS,
    SHOP_PLURALS,
    VARIABLES,
)

_BLACK = INK["black"]
_MAX_FACTOR = 12  # multiplications stay within times tables
_MAX_VALUE = 1000  # and below 4 digits, which keeps level-5 targets under ~60 tokens


def apply(op: str, x: int, y: int) -> int:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    if op == "/":
        return x // y
    raise ValueError(op)


def _rows_scene(rng: random.Random, difficulty: int, rows: list[list[Shape | Text]], row_h: int) -> Scene:
    """Stack rows (each a list of items laid out at y=0) in equal horizontal bands."""
    band = IMAGE_SIZE // len(rows)
    items: list[Shape | Text] = []
    for i, row in enumerate(rows):
        dy = i * band + rng.randint(2, max(2, band - row_h - 2))
        dx = rng.randint(4, max(4, min(24, IMAGE_SIZE - 5 - _row_width(row))))
        for it in row:
            if isinstance(it, Shape):
                x1, y1, x2, y2 = it.box
                items.append(Shape(it.kind, it.color, (x1 + dx, y1 + dy, x2 + dx, y2 + dy)))
            else:
                items.append(Text(it.text, (it.xy[0] + dx, it.xy[1] + dy), it.size, it.fill))
    return Scene(background(rng, difficulty), items, noise_level(difficulty), rng.getrandbits(32))


def _row_width(row: list[Shape | Text]) -> int:
    return max(it.box[2] if isinstance(it, Shape) else it.xy[0] + text_size(it.text, it.size)[0] for it in row)


def _text_rows(rng: random.Random, difficulty: int, lines: list[str], size: int) -> Scene:
    ink = _BLACK if difficulty <= 3 else rng.choice(list(INK.values()))
    h = max(text_size(t, size)[1] for t in lines)
    return _rows_scene(rng, difficulty, [[Text(t, (0, 0), size, ink)] for t in lines], h)


# --- arith -----------------------------------------------------------------

_ARITH = {  # n image numbers, value range, constants from the text, font size
    1: (2, (1, 9), 0, 34),
    2: (2, (2, 20), 0, 30),
    3: (3, (2, 20), 0, 26),
    4: (3, (5, 50), 1, 24),
    5: (4, (10, 99), 0, 22),
}
_FIRST = {"+": "Add {x} and {y}", "-": "Subtract {y} from {x}", "*": "Multiply {x} by {y}"}
_THEN = {"+": "then add {y}", "-": "then subtract {y}", "*": "then multiply by {y}", "/": "then divide by {y}"}


def _pick_op(rng: random.Random, cur: int, y: int, ops: tuple[str, ...]) -> str:
    allowed = [op for op in ops if (op != "-" or y <= cur)
               and (op != "*" or (min(y, cur) <= _MAX_FACTOR and cur * y < _MAX_VALUE))
               and (op != "/" or (y > 1 and cur % y == 0))]
    return rng.choice(allowed or ["+"])


def arith(rng: random.Random, difficulty: int) -> Item:
    n, (lo, hi), n_const, size = _ARITH[difficulty]
    names = VARIABLES[:n]
    vals = [rng.randint(lo, hi) for _ in names]
    ops = ("+", "-") if difficulty == 1 else ("+", "-", "*")
    cur, steps, phrases, chain = vals[0], [], [], []
    for i in range(1, n):
        op = _pick_op(rng, cur, vals[i], ops)
        new = apply(op, cur, vals[i])
        steps.append(f"{cur} {op} {vals[i]} = {new}")
        phrases.append((_FIRST if i == 1 else _THEN)[op].format(x=names[0], y=names[i]))
        chain.append([op, names[i]])
        cur = new
    for _ in range(n_const):
        divisors = [k for k in range(2, 10) if cur % k == 0 and cur > 0]
        if divisors and rng.random() < 0.3:
            op, k = "/", rng.choice(divisors)
        else:
            k = rng.randint(2, 9)
            op = _pick_op(rng, cur, k, ("+", "-", "*"))
        new = apply(op, cur, k)
        steps.append(f"{cur} {op} {k} = {new}")
        phrases.append(_THEN[op].format(y=k))
        chain.append([op, k])
        cur = new
    shown = list(zip(names, vals))
    if difficulty >= 4:
        rng.shuffle(shown)  # rows out of order: the model must read labels, not positions
    scene = _text_rows(rng, difficulty, [f"{k} = {v}" for k, v in shown], size)
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    question = f"The image shows {listed}. " + ", ".join(phrases) + "."
    answer = str(cur)
    meta = {"values": dict(zip(names, vals)), "chain": chain}
    return Item(question, worked([s + "." for s in steps], answer), answer, meta, scene)


# --- word_problem ----------------------------------------------------------

def _qty_phrase(q: int, item: str) -> str:
    return f"a {item}" if q == 1 else f"{q} {SHOP_PLURALS[item]}"


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _shop(rng: random.Random, difficulty: int) -> Item:
    n_list, n_buy, (plo, phi), (qlo, qhi), change = {
        1: (2, 1, (1, 9), (2, 4), False),
        2: (3, 2, (1, 9), (1, 1), False),
        3: (3, 2, (2, 15), (1, 4), False),
        4: (4, 3, (2, 12), (1, 3), False),
        5: (4, 2, (2, 25), (2, 5), True),
    }[difficulty]
    items = rng.sample(SHOP_ITEMS, n_list)
    prices = {it: rng.randint(plo, phi) for it in items}
    bought = rng.sample(items, n_buy)
    qty = {it: rng.randint(qlo, qhi) for it in bought}
    name, pron = rng.choice(NAMES)
    steps, costs = [], []
    for it in bought:
        c = qty[it] * prices[it]
        if qty[it] > 1:
            steps.append(f"{qty[it]} * {prices[it]} = {c}.")
        costs.append(c)
    total = costs[0]
    for c in costs[1:]:
        steps.append(f"{total} + {c} = {total + c}.")
        total += c
    question = (f"The image shows prices. {name} buys {_and([_qty_phrase(qty[it], it) for it in bought])}. ")
    if change:
        paid = next(b for b in (20, 50, 100, 200, 500) if b > total)
        steps.append(f"{paid} - {total} = {paid - total}.")
        question += f"{pron.capitalize()} pays with {paid}. How much change does {pron} get?"
        answer = paid - total
    else:
        question += f"How much does {pron} pay?"
        answer = total
    if not steps:  # one item bought once: the answer is read straight off the image
        steps.append(f"{bought[0]} = {total}.")
    scene = _text_rows(rng, difficulty, [f"{it} {prices[it]}" for it in items], {1: 28, 2: 26, 3: 24, 4: 22, 5: 22}[difficulty])
    meta = {"template": "shop", "prices": prices, "quantities": qty}
    return Item(question, worked(steps, str(answer)), str(answer), meta, scene)


def _marbles(rng: random.Random, difficulty: int) -> Item:
    n_colors, (lo, hi) = {1: (2, (1, 9)), 2: (3, (2, 20)), 3: (3, (1, 20)), 4: (3, (5, 30)), 5: (4, (2, 20))}[difficulty]
    colors = rng.sample(MARBLE_COLORS, n_colors)
    counts = {c: rng.randint(lo, hi) for c in colors}
    name, _ = rng.choice(NAMES)
    intro = f"The image shows how many marbles of each color {name} has. "
    steps: list[str] = []
    if difficulty == 1:
        a, b = colors
        ans = counts[a] + counts[b]
        q = f"How many {a} and {b} marbles are there together?"
        steps.append(f"{counts[a]} + {counts[b]} = {ans}.")
    elif difficulty == 2:
        a, b = rng.sample(colors, 2)
        if counts[a] == counts[b]:
            counts[a] += rng.randint(1, 5)
        if counts[a] < counts[b]:
            a, b = b, a
        ans = counts[a] - counts[b]
        q = f"How many more {a} marbles than {b} marbles are there?"
        steps.append(f"{counts[a]} - {counts[b]} = {ans}.")
    elif difficulty in (3, 4):
        ans = counts[colors[0]]
        for c in colors[1:]:
            steps.append(f"{ans} + {counts[c]} = {ans + counts[c]}.")
            ans += counts[c]
        q = "How many marbles are there in all?"
        if difficulty == 4:
            give_c, get_c = rng.sample(colors, 2)
            give, get = rng.randint(2, min(9, counts[give_c])), rng.randint(2, 9)
            steps += [f"{ans} - {give} = {ans - give}.", f"{ans - give} + {get} = {ans - give + get}."]
            ans = ans - give + get
            q = (f"{name} gives away {give} {give_c} marbles and gets {get} {get_c} marbles. "
                 "How many marbles are there now?")
    else:
        a, b = rng.sample(colors, 2)  # the other shown colours are distractors
        pa, pb = rng.sample(range(2, 10), 2)
        steps += [f"{counts[a]} * {pa} = {counts[a] * pa}.", f"{counts[b]} * {pb} = {counts[b] * pb}."]
        ans = counts[a] * pa + counts[b] * pb
        steps.append(f"{counts[a] * pa} + {counts[b] * pb} = {ans}.")
        q = (f"Each {a} marble is worth {pa} points and each {b} marble is worth {pb} points. "
             f"How many points are the {a} and {b} marbles worth?")
    size = {1: 30, 2: 26, 3: 26, 4: 24, 5: 22}[difficulty]
    ink = _BLACK if difficulty <= 3 else rng.choice(list(INK.values()))
    sw = size - 4
    rows = [[Shape("circle", c, (0, 0, sw, sw)), Text(str(counts[c]), (sw + 8, (sw - text_size("0", size)[1]) // 2), size, ink)]
            for c in colors]
    scene = _rows_scene(rng, difficulty, rows, sw)
    meta = {"template": "marbles", "counts": counts}
    return Item(intro + q, worked(steps, str(ans)), str(ans), meta, scene)


def word_problem(rng: random.Random, difficulty: int) -> Item:
    return (_shop if rng.random() < 0.5 else _marbles)(rng, difficulty)

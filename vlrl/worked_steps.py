"""Reading a worked solution ("3 * 5 = 15. 15 + 8 = 23. \\boxed{23}"): its sentences before
the box, and the computations among them with whether each holds.

Shared by the eval's step diagnosis (vlrl/step_errors.py) and the `step_match` reward term,
so that both read a solution the same way. Expressions are parsed into exact fractions,
never evaluated as code.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from fractions import Fraction

BOX = re.compile(r"\\boxed\{")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")  # a full stop, not a decimal point
_ARITHMETIC = re.compile(r"^[\d\s.+\-*/()]+$")
_DECIMAL = re.compile(r"^\s*-?\d+\.(\d+)\s*$")
MAX_EXPRESSION = 200  # characters: a worked step is short; longer runs are not steps (and would nest deeply)
_OPERATOR = re.compile(r"(?<=[\d)\s])[-+*/]")  # binary: after a number, a bracket or a space
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def sentences_before_box(text: str) -> list[str]:
    return _SENTENCE_END.split(BOX.split(text, maxsplit=1)[0])


def exact_value(expr: str) -> Fraction | None:
    """The exact value of numbers joined by + - * / and brackets; None for anything else
    (words, variables, powers, a division by zero)."""
    expr = expr.replace("×", "*").replace("÷", "/").strip()
    if not expr or len(expr) > MAX_EXPRESSION or not _ARITHMETIC.match(expr):
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except (SyntaxError, RecursionError):
        return None

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(ast.get_source_segment(expr, node))  # the literal as written: no float rounding
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        raise ValueError(node)

    try:
        return value(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def _agrees(exact: Fraction, side: str, value: Fraction) -> bool:
    """A later side equals the first, or is it rounded to the decimals it is written with
    ("10 / 3 = 3.33" holds; "10 / 3 = 3.3" does too, "10 / 3 = 3.4" does not)."""
    if value == exact:
        return True
    m = _DECIMAL.match(side)
    return m is not None and abs(exact - value) <= Fraction(5, 10 ** (len(m.group(1)) + 1))


@dataclass(frozen=True)
class Computation:
    operands: tuple[str, ...]  # the numbers of its first side, as written
    ops: str  # its first side's operators in order ("+*" for "2 + 3 * 4")
    holds: bool  # every later side equals the first (or is it rounded, when written as a decimal)
    text: str  # the sentence, spaces collapsed ("6 + 2 = 8")


def computations(text: str) -> list[Computation]:
    """Each computation before the first \\boxed{: a sentence whose first side has an
    operator and whose sides are all arithmetic. "60 = 60" and "cup = 5" compute nothing
    and are left out; a chain "3 + 4 = 7 = 7" is one computation."""
    out: list[Computation] = []
    for sentence in sentences_before_box(text):
        sides = sentence.replace("×", "*").replace("÷", "/").split("=")
        ops = "".join(_OPERATOR.findall(sides[0]))
        if len(sides) < 2 or not ops:
            continue
        values = [exact_value(side) for side in sides]
        if all(v is not None for v in values):
            text = " ".join(sentence.split())
            holds = all(_agrees(values[0], side, v) for side, v in zip(sides[1:], values[1:]))
            out.append(Computation(tuple(NUMBER.findall(sides[0])), ops, holds, text))
    return out

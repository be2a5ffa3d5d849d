"""Answer extraction and checking shared by eval, the synthetic world and rewards.

The synthetic world asks every task for its final answer inside `\\boxed{...}`;
eval (greedy accuracy) and the rule rewards both read answers through these
functions so that "correct" means the same thing everywhere. Checking is strict
and cheap on purpose: the math-verify / sympy path lives in `rewards/`, where it
runs under a timeout.
"""

from __future__ import annotations

import math
import re
from typing import Literal

AnswerType = Literal["number", "text", "box"]

# How each synthetic task's answer is compared. Records may override this with
# meta["answer_type"]; tasks not listed compare as text.
TASK_ANSWER_TYPES: dict[str, AnswerType] = {
    "read_digits": "text",  # leading zeros matter when reading
    "read_word": "text",
    "count_shapes": "number",
    "shape_color": "text",
    "shape_position": "text",
    "bbox": "box",
    "arith": "number",
    "word_problem": "number",
    "text_arith": "number",
    "text_fact": "text",
}

NUM_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    out = []
    while i < len(text):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return "".join(out).strip()
        out.append(ch)
        i += 1
    return None  # unbalanced: treat as no answer


def extract_answer(text: str) -> str:
    """The boxed answer if any, else the last non-empty line (lenient for base models)."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def normalize_text(s: str) -> str:
    s = s.strip().lower()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"[\s_]+", " ", s)
    return s.strip(" .,!?;:'\"")


def parse_number(s: str) -> float | None:
    """First number in s (ints, decimals, a/b fractions, thousands commas); None if none."""
    m = NUM_RE.search(s.replace("\\!", "").replace(" ", ""))
    if not m:
        return None
    tok = m.group(0).replace(",", "")
    try:
        if "/" in tok:
            num, den = tok.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(tok)
    except ValueError:
        return None


def parse_box(s: str) -> tuple[float, float, float, float] | None:
    """A box written as four numbers `[x1, y1, x2, y2]` (any brackets/separators)."""
    nums = re.findall(r"[-+]?\d+(?:\.\d+)?", s)
    if len(nums) != 4:
        return None
    x1, y1, x2, y2 = (float(n) for n in nums)
    if x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def answer_type_for(task: str, meta: dict | None = None) -> AnswerType:
    if meta and meta.get("answer_type") in ("number", "text", "box"):
        return meta["answer_type"]
    return TASK_ANSWER_TYPES.get(task, "text")


def is_correct(response: str, reference: str, answer_type: AnswerType, iou_threshold: float = 0.5) -> bool:
    """Strict correctness of a response against the reference answer."""
    pred = extract_answer(response)
    if answer_type == "number":
        p, r = parse_number(pred), parse_number(reference)
        return p is not None and r is not None and math.isclose(p, r, rel_tol=1e-6, abs_tol=1e-9)
    if answer_type == "box":
        p, r = parse_box(pred), parse_box(reference)
        return p is not None and r is not None and box_iou(p, r) >= iou_threshold
    return normalize_text(pred) == normalize_text(reference)

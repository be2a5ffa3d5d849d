"""Rule rewards shipped with vlrl.

Answers are read with `vlrl.answers` (the boxed answer, else the last line), so eval's
greedy accuracy and these rewards agree on what was answered. math-verify and sympy
sit on top of that for math, and run in the process pool because they can hang.

Conventions: accuracy-like rewards return 1.0 / 0.0 (or a value in [0, 1]), and `None`
when the record has no reference answer to check against (the rule cannot decide, so a
gate may ask a model instead). Penalties are <= 0.
"""

from __future__ import annotations

import math
import re
import threading

from vlrl.answers import (
    NUM_RE,
    answer_type_for,
    box_iou,
    extract_answer,
    extract_boxed,
    is_correct,
    normalize_text,
    parse_box,
    parse_number,
)

from rewards.api import RewardSample, reward
from rewards.pool import in_worker

# --------------------------------------------------------------------------------------
# Math


def _strip_math(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    return s.replace("\\!", "").replace("\\,", "").replace("\\ ", "")


def _plain_number(s: str) -> float | None:
    s = s.replace(" ", "")
    return parse_number(s) if NUM_RE.fullmatch(s) else None


def _mv_timeout(seconds: int | None) -> int | None:
    # math-verify's own timeouts use SIGALRM and, when they fire, quietly answer "not equal".
    # In a pool worker the parent kills a stuck call and reports a timeout instead, so they
    # are off there; off the main thread SIGALRM is not available at all.
    if in_worker() or not seconds or threading.current_thread() is not threading.main_thread():
        return None
    return seconds


def _math_verify_equal(gold: str, pred: str, seconds: int | None) -> bool | None:
    """True/False when math-verify parsed both sides, None when it could not parse one."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    t = _mv_timeout(seconds)
    g = parse(f"${gold}$", extraction_config=cfg, parsing_timeout=t)
    p = parse(f"${pred}$", extraction_config=cfg, parsing_timeout=t)
    if not g or not p:
        return None
    return bool(verify(g, p, timeout_seconds=t))


_LATEX_TO_SYMPY = [
    (re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}"), r"((\1)/(\2))"),
    (re.compile(r"\\sqrt\{([^{}]*)\}"), r"sqrt(\1)"),
    (re.compile(r"\\left|\\right"), ""),
    (re.compile(r"\\cdot|\\times"), "*"),
    (re.compile(r"\\pi"), "pi"),
    (re.compile(r"\^"), "**"),
    (re.compile(r"[{}]"), lambda m: "(" if m.group(0) == "{" else ")"),
]


def _sympy_equal(gold: str, pred: str) -> bool | None:
    """A small LaTeX -> sympy fallback; None when either side does not parse."""
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    tr = standard_transformations + (implicit_multiplication_application, convert_xor)

    def to_expr(s: str):
        for pat, rep in _LATEX_TO_SYMPY:
            s = pat.sub(rep, s)
        if len(s) > 300 or "__" in s or "lambda" in s:
            return None
        return parse_expr(s, transformations=tr, evaluate=True)

    try:
        a, b = to_expr(gold), to_expr(pred)
    except Exception:
        return None
    if a is None or b is None:
        return None
    try:
        return bool(sympy.simplify(a - b) == 0)
    except Exception:
        return None


def warmup() -> None:
    """Import math-verify's LaTeX parser now (about a second), not on the first sample."""
    _math_verify_equal("1", "1", 5)


@reward("math_accuracy", correct_at=1.0, bounds=(0.0, 1.0))
def math_accuracy(
    sample: RewardSample, *, require_boxed: bool = False, parse_timeout_s: int | None = 5, max_answer_chars: int = 1000
) -> float | None:
    """1.0 when the answer equals the reference mathematically (math-verify, then sympy), else 0.0.

    Plain numbers compare numerically first (as eval does); answers longer than
    `max_answer_chars` compare as text only; None without a reference."""
    if sample.answer is None or not str(sample.answer).strip():
        return None
    pred = extract_boxed(sample.response) if require_boxed else extract_answer(sample.response)
    if not pred:
        return 0.0
    gold, pred = _strip_math(str(sample.answer)), _strip_math(pred)
    if gold == pred:
        return 1.0
    a, b = _plain_number(gold), _plain_number(pred)
    if a is not None and b is not None:
        return float(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))
    if len(pred) > max_answer_chars:  # no parser should see a runaway answer
        return float(normalize_text(gold) == normalize_text(pred))
    verdict = _math_verify_equal(gold, pred, parse_timeout_s)
    if verdict is None:
        verdict = _sympy_equal(gold, pred)
    if verdict is None:
        verdict = normalize_text(gold) == normalize_text(pred)
    return float(verdict)


# --------------------------------------------------------------------------------------
# Format

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def _check_format_options(think: str = "optional", answer: str = "boxed") -> None:
    if think not in ("required", "optional", "forbidden"):
        raise ValueError(f"think must be required, optional or forbidden, not {think!r}")
    if answer not in ("boxed", "tag", "any"):
        raise ValueError(f"answer must be boxed, tag or any, not {answer!r}")


@reward("format", validate=_check_format_options, bounds=(0.0, 1.0))
def format_reward(sample: RewardSample, *, think: str = "optional", answer: str = "boxed") -> float:
    """1.0 when the response has the asked shape: <think>...</think> (required / optional /
    forbidden) followed by a final answer in \\boxed{} (answer="boxed"), <answer></answer>
    tags (answer="tag") or anything (answer="any")."""
    _check_format_options(think, answer)
    text = sample.response.strip()
    n_open, n_close = text.count(_THINK_OPEN), text.count(_THINK_CLOSE)
    if n_open or n_close:
        if think == "forbidden":
            return 0.0
        if n_open != 1 or n_close != 1 or not text.startswith(_THINK_OPEN):
            return 0.0
        body, _, rest = text[len(_THINK_OPEN) :].partition(_THINK_CLOSE)
        if not body.strip():
            return 0.0
    elif think == "required":
        return 0.0
    else:
        rest = text
    if answer == "boxed":
        boxed = extract_boxed(rest)
        return float(bool(boxed))
    if answer == "tag":
        m = re.fullmatch(r"(?s)(.*?)<answer>(.*?)</answer>\s*", rest)
        return float(bool(m and m.group(2).strip() and "<answer>" not in m.group(2)))
    return float(bool(rest.strip()))


# --------------------------------------------------------------------------------------
# Matching


@reward("exact_match", correct_at=1.0, bounds=(0.0, 1.0))
def exact_match(sample: RewardSample) -> float | None:
    """1.0 when the answer equals the reference after normalisation (case, spaces, \\text{})."""
    if sample.answer is None:
        return None
    return float(normalize_text(extract_answer(sample.response)) == normalize_text(str(sample.answer)))


@reward("number_match", correct_at=1.0, bounds=(0.0, 1.0))
def number_match(sample: RewardSample, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float | None:
    """1.0 when the first number of the answer equals the reference's (fractions, commas ok)."""
    if sample.answer is None:
        return None
    ref = parse_number(str(sample.answer))
    if ref is None:
        return None
    pred = parse_number(extract_answer(sample.response))
    return float(pred is not None and math.isclose(pred, ref, rel_tol=rel_tol, abs_tol=abs_tol))


_CHOICE_RE = re.compile(r"(?:^|[^A-Za-z])\(?([A-Z])\)?(?:[^A-Za-z]|$)")


def _choice_letter(text: str, choices: list[str] | None) -> str | None:
    t = text.strip()
    if choices:
        norm = normalize_text(t)
        for i, c in enumerate(choices):
            if normalize_text(str(c)) == norm:
                return chr(ord("A") + i)
    if re.fullmatch(r"\(?[A-Za-z]\)?\.?", t):
        return t.strip("().").upper()
    m = _CHOICE_RE.search(t)
    return m.group(1) if m else None


@reward("choice_match", correct_at=1.0, bounds=(0.0, 1.0))
def choice_match(sample: RewardSample) -> float | None:
    """1.0 when the chosen option letter (or option text, with meta["choices"]) is the reference's."""
    if sample.answer is None:
        return None
    choices = sample.meta.get("choices") if isinstance(sample.meta.get("choices"), list) else None
    ref = _choice_letter(str(sample.answer), choices)
    if ref is None:
        return None
    return float(_choice_letter(extract_answer(sample.response), choices) == ref)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, ref: str, threshold: float = 0.5) -> float:
    """1 - normalised edit distance, 0 when that distance exceeds `threshold` (ANLS)."""
    p, r = normalize_text(pred), normalize_text(ref)
    longest = max(len(p), len(r))
    if longest == 0:
        return 1.0
    if abs(len(p) - len(r)) / longest > threshold:  # edit distance >= length gap: skip the O(nm) work
        return 0.0
    dist = levenshtein(p, r) / longest
    return 0.0 if dist > threshold else 1.0 - dist


@reward("ocr_similarity", correct_at=1.0, bounds=(0.0, 1.0))
def ocr_similarity(sample: RewardSample, *, threshold: float = 0.5) -> float | None:
    """ANLS text similarity in [0, 1] for reading tasks; 1.0 only for an exact (normalised) read."""
    if sample.answer is None:
        return None
    return anls(extract_answer(sample.response), str(sample.answer), threshold)


@reward("iou", correct_at=0.5, bounds=(0.0, 1.0))
def iou(sample: RewardSample) -> float | None:
    """IoU of the answered box [x1, y1, x2, y2] with the reference box; 0.0 for no box."""
    ref = parse_box(str(sample.answer)) if sample.answer is not None else None
    if ref is None:
        return None
    pred = parse_box(extract_answer(sample.response))
    return 0.0 if pred is None else box_iou(pred, ref)


@reward("counting", correct_at=1.0, bounds=(0.0, 1.0))
def counting(sample: RewardSample, *, partial: bool = False) -> float | None:
    """1.0 for the right count; with partial=True, max(0, 1 - |n - ref| / max(ref, 1))."""
    ref = parse_number(str(sample.answer)) if sample.answer is not None else None
    if ref is None:
        return None
    pred = parse_number(extract_answer(sample.response))
    if pred is None:
        return 0.0
    if pred == ref:
        return 1.0
    return max(0.0, 1.0 - abs(pred - ref) / max(abs(ref), 1.0)) if partial else 0.0


@reward("answer_match", correct_at=1.0, bounds=(0.0, 1.0))
def answer_match(sample: RewardSample, *, iou_threshold: float = 0.5) -> float | None:
    """Task-aware accuracy (numbers via math_accuracy, boxes by IoU threshold, text exactly):
    the same verdict as eval's `vlrl.answers.is_correct`, with math-verify for numbers."""
    if sample.answer is None:
        return None
    kind = answer_type_for(sample.task, sample.meta)
    if kind == "number":
        return math_accuracy(sample)
    return float(is_correct(sample.response, str(sample.answer), kind, iou_threshold=iou_threshold))


# --------------------------------------------------------------------------------------
# Repetition


@reward("repetition_penalty")
def repetition_penalty(sample: RewardSample, *, n: int = 3, scale: float = 1.0) -> float:
    """-scale x (1 - distinct n-grams / n-grams) over the response's tokens (ids if known, else words).

    0 for a response without repeats, close to -scale for a loop."""
    toks = list(sample.response_ids) if sample.response_ids is not None else sample.response.split()
    total = len(toks) - n + 1
    if total <= 0:
        return 0.0
    grams = {tuple(toks[i : i + n]) for i in range(total)}
    return -scale * (1.0 - len(grams) / total)

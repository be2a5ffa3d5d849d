"""Built-in rule rewards and the formula-based terms, against hand-computed values."""

from __future__ import annotations

import pytest

from vlrl.answers import TASK_ANSWER_TYPES, is_correct

from rewards import RewardSample, RewardStack
from rewards import rules, terms
from rewards.stack import DEFAULT_ROUTING


def S(response, answer=None, **kw):
    return RewardSample(response=response, answer=answer, **kw)


# ---- math


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        (r"\boxed{x^2+1}", "1+x^2", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{3}", "4", 0.0),
        ("the answer is 42", "42", 1.0),  # last line, as eval reads it
        ("no answer here", "7", 0.0),
        (r"\boxed{7}", None, None),
    ],
)
def test_math_accuracy(response, answer, expected):
    assert rules.math_accuracy(S(response, answer)) == expected


def test_math_accuracy_require_boxed():
    assert rules.math_accuracy(S("42", "42"), require_boxed=True) == 0.0


def test_sympy_fallback():
    assert rules._sympy_equal(r"\frac{2}{4}", "1/2") is True
    assert rules._sympy_equal("x*2", "2x") is True
    assert rules._sympy_equal("x+1", "x+2") is False
    assert rules._sympy_equal("((", "1") is None


# ---- format


@pytest.mark.parametrize(
    "response, kw, expected",
    [
        (r"<think>a</think> \boxed{1}", {}, 1.0),
        (r"\boxed{1}", {}, 1.0),
        (r"\boxed{1}", {"think": "required"}, 0.0),
        (r"<think></think>\boxed{1}", {}, 0.0),  # empty reasoning
        (r"<think>a</think><think>b</think>\boxed{1}", {}, 0.0),
        (r"x <think>a</think>\boxed{1}", {}, 0.0),  # must open with <think>
        (r"<think>a</think> 1", {}, 0.0),
        (r"<think>a</think> \boxed{1}", {"think": "forbidden"}, 0.0),
        ("<think>a</think><answer>1</answer>", {"answer": "tag"}, 1.0),
        ("<answer></answer>", {"answer": "tag"}, 0.0),
        ("anything", {"answer": "any"}, 1.0),
    ],
)
def test_format(response, kw, expected):
    assert rules.format_reward(S(response), **kw) == expected


# ---- matching


def test_exact_number_choice_match():
    assert rules.exact_match(S(r"\boxed{\text{Red}}", "red")) == 1.0
    assert rules.exact_match(S(r"\boxed{blue}", "red")) == 0.0
    assert rules.number_match(S(r"\boxed{3/4}", "0.75")) == 1.0
    assert rules.number_match(S(r"\boxed{0.7501}", "0.75")) == 0.0
    assert rules.choice_match(S(r"\boxed{(B)}", "B")) == 1.0
    assert rules.choice_match(S("The answer is C.", "B")) == 0.0
    assert rules.choice_match(S(r"\boxed{a cat}", "B", meta={"choices": ["a dog", "a cat"]})) == 1.0


def test_ocr_similarity_is_anls():
    # "hullo" vs "hello": edit distance 1 over 5 characters -> 0.8
    assert rules.ocr_similarity(S(r"\boxed{hullo}", "hello")) == pytest.approx(0.8)
    # "hxxxo": distance 3/5 = 0.6 > 0.5 -> 0
    assert rules.ocr_similarity(S(r"\boxed{hxxxo}", "hello")) == 0.0
    assert rules.ocr_similarity(S(r"\boxed{Hello}", "hello")) == 1.0
    assert rules.levenshtein("kitten", "sitting") == 3


def test_iou_and_counting():
    # [0,0,10,10] vs [0,0,10,5]: intersection 50, union 100
    assert rules.iou(S(r"\boxed{[0, 0, 10, 10]}", "[0, 0, 10, 5]")) == pytest.approx(0.5)
    assert rules.iou(S("no box", "[0, 0, 10, 5]")) == 0.0
    assert rules.counting(S(r"\boxed{5}", "5")) == 1.0
    assert rules.counting(S(r"\boxed{3}", "4")) == 0.0
    assert rules.counting(S(r"\boxed{3}", "4"), partial=True) == pytest.approx(0.75)  # 1 - 1/4


def test_repetition_penalty_hand_computed():
    # words a b a b a b: 3-grams (a b a), (b a b), (a b a), (b a b): 2 distinct of 4 -> -(1 - 2/4)
    assert rules.repetition_penalty(S("a b a b a b")) == pytest.approx(-0.5)
    assert rules.repetition_penalty(S("one two three four")) == 0.0
    assert rules.repetition_penalty(S("x", response_ids=[1, 1, 1, 1, 1]), n=2) == pytest.approx(-0.75)  # 1 distinct of 4
    assert rules.repetition_penalty(S("a b")) == 0.0


# ---- the synthetic task world: default routing agrees with eval's is_correct


WORLD = {
    "read_digits": ("0427", [r"\boxed{0427}", r"\boxed{427}", "0427"]),
    "read_word": ("apple", [r"\boxed{Apple}", r"\boxed{appel}", r"\boxed{pear}"]),
    "shape_color": ("red", [r"\boxed{red}", r"\boxed{blue}"]),
    "shape_position": ("top left", [r"\boxed{Top  left}", r"\boxed{bottom left}"]),
    "text_fact": ("paris", [r"\boxed{Paris.}", r"\boxed{london}"]),
    "count_shapes": ("3", [r"\boxed{3}", r"\boxed{4}", "there are 3"]),
    "arith": ("12", [r"\boxed{12}", r"\boxed{12.0}", r"\boxed{13}"]),
    "word_problem": ("-5", [r"\boxed{-5}", r"\boxed{5}"]),
    "text_arith": ("1.5", [r"\boxed{3/2}", r"\boxed{1.4}"]),
    "bbox": ("[10, 10, 50, 50]", [r"\boxed{[10, 10, 50, 50]}", r"\boxed{[12, 10, 50, 52]}", r"\boxed{[60, 60, 70, 70]}"]),
}


def test_world_covers_every_task():
    assert set(WORLD) == set(TASK_ANSWER_TYPES) == set(DEFAULT_ROUTING)


def test_default_stack_scores_the_task_world_like_eval():
    samples, expected = [], []
    for task, (answer, responses) in WORLD.items():
        for r in responses:
            samples.append(S(r, answer, task=task))
            expected.append(is_correct(r, answer, TASK_ANSWER_TYPES[task]))
    with RewardStack.from_config({"workers": 0}) as stack:
        results = stack.score(samples)
    for s, r, want in zip(samples, results, expected):
        assert r.correct == want, (s.task, s.response, r.components)
        assert not r.failures
    # the accuracy component is exactly 1.0 where eval says correct (IoU and OCR may be partial otherwise)
    for s, r, want in zip(samples, results, expected):
        acc = DEFAULT_ROUTING[s.task][0]
        assert (r.components[acc] == 1.0) == want or s.task == "bbox"


# ---- length terms


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (80, 0.0), (90, -0.5), (99, -0.95), (100, -1.0), (150, -1.0)],
)
def test_dapo_overlong(length, expected):
    # L_max=100, L_cache=20: soft from 80; at 90: (80-90)/20 = -0.5
    assert terms.overlong_penalty(length, 100, 20) == pytest.approx(expected)
    assert terms.OverlongPenalty(max_length=100, cache=20)(S("x", response_length=length)) == pytest.approx(expected)


def test_overlong_rejects_bad_options():
    with pytest.raises(ValueError):
        terms.OverlongPenalty(max_length=10, cache=20)


def _group(lengths, correct):
    g = tuple(S("w " * n, response_length=n, group_id="g") for n in lengths)
    for i, (m, c) in enumerate(zip(g, correct)):
        m.group, m.group_index, m.correct = g, i, c
    return g


def test_kimi_group_length_hand_computed():
    # lengths 10, 20, 30 -> lambda = 0.5, 0, -0.5; wrong ones keep min(0, lambda)
    g = _group([10, 20, 30], [True, True, False])
    assert [terms.group_length(m) for m in g] == pytest.approx([0.5, 0.0, -0.5])
    g = _group([10, 20, 30], [False, True, True])
    assert [terms.group_length(m) for m in g] == pytest.approx([0.0, 0.0, -0.5])
    g = _group([7, 7], [True, False])
    assert [terms.group_length(m) for m in g] == [0.0, 0.0]
    assert terms.group_length(_group([5], [None])[0]) is None


def test_conciseness_hand_computed():
    # shortest correct = 20: correct 20 -> 0, correct 40 -> 20/40 - 1 = -0.5; wrong -> 0
    g = _group([10, 20, 40], [False, True, True])
    assert [terms.conciseness(m) for m in g] == pytest.approx([0.0, 0.0, -0.5])
    g = _group([10, 20], [False, False])
    assert [terms.conciseness(m) for m in g] == [0.0, 0.0]


def test_diversity_hand_computed():
    texts = ["the cat sat on the mat", "the cat sat on the mat", "a dog ran in the park today"]
    g = tuple(S(t, group_id="g") for t in texts)
    for i, (m, c) in enumerate(zip(g, [True, False, True])):
        m.group, m.group_index, m.correct = g, i, c
    d = terms.Diversity(n=3, threshold=0.8)
    # 0 and 1 are identical (sim 1): correct 0 gets 1 - 1 = 0; wrong 1 gets -1; 2 shares no 3-gram: 1 - 0 = 1
    assert [d(m) for m in g] == pytest.approx([0.0, -1.0, 1.0])
    # Jaccard of 3-gram sets: "a b c d" vs "a b c e" -> {abc, bcd} & {abc, bce} = 1 of 3
    assert terms.ngram_similarity("a b c d", "a b c e") == pytest.approx(1 / 3)


def test_diversity_pluggable_similarity():
    d = terms.Diversity(similarity="rewards.terms:ngram_similarity", threshold=0.0)
    g = tuple(S(t, group_id="g") for t in ["a b c d", "a b c e"])
    for i, m in enumerate(g):
        m.group, m.group_index, m.correct = g, i, False
    assert d(g[0]) == pytest.approx(-1 / 3)
    with pytest.raises(ValueError):
        terms.Diversity(similarity="nope")
    assert d(S("alone")) == 0.0

"""The step_match term against hand-counted matches, in the stack and on task-world records."""

from __future__ import annotations

import random

import pytest

from rewards import RewardSample, RewardStack
from rewards.steps import equation_numbers, step_match, step_match_score
from vlrl.data.synth import reasoning
from vlrl.data.synth.item import Item

REF = r"3 * 5 = 15. 15 + 8 = 23. \boxed{23}"


def test_equation_numbers_reads_equations_before_the_box_only():
    assert equation_numbers(REF) == ["3", "5", "15", "15", "8", "23"]
    assert equation_numbers(r"cup = 5. \boxed{5}") == ["5"]
    assert equation_numbers(r"1.5 + 2 = 3.5. 20 - 3.5 = 16.5. \boxed{16.5}") == ["1.5", "2", "3.5", "20", "3.5", "16.5"]
    assert equation_numbers(r"I think 7 apples. \boxed{3 + 4 = 7}") == []  # no equation before the box


@pytest.mark.parametrize(
    "response, expected",
    [
        (REF, 1.0),
        (r"3 * 5 = 15. 15 + 9 = 24. \boxed{24}", 4 / 6),  # read 8 as 9: two numbers off
        (r"3 * 6 = 18. 18 + 8 = 26. \boxed{26}", 2 / 6),  # misread 5 as 6: what is computed from it is off too
        (r"\boxed{23}", 0.0),  # right answer, no steps: no credit from this term
        (r"3 * 5 = 15. \boxed{15}", 3 / 6),  # stopped early
        (r"3 * 5 = 15. 15 + 8 = 23. 23 + 0 = 23. \boxed{23}", 6 / 9),  # padding costs
    ],
)
def test_step_match_hand_counted(response, expected):
    assert step_match_score(response, REF) == pytest.approx(expected)
    assert step_match(RewardSample(response=response, reference=REF)) == pytest.approx(expected)


def test_step_match_is_none_without_equations_to_compare():
    assert step_match(RewardSample(response="3 + 4 = 7", reference=None)) is None
    assert step_match(RewardSample(response="3 + 4 = 7", reference=r"\boxed{star}")) is None


def test_task_world_references_score_one_against_themselves_and_less_for_a_misread():
    rng = random.Random(0)
    for difficulty in (1, 2, 3, 4, 5):
        for gen in (reasoning.arith, reasoning.word_problem):
            item: Item = gen(rng, difficulty)
            assert step_match_score(item.target, item.target) == 1.0, item.target
            first = equation_numbers(item.target)[0]
            wrong = item.target.replace(first, str(int(first) + 1), 1)
            assert step_match_score(wrong, item.target) < 1.0


def test_in_the_stack_the_term_adds_weighted_credit_and_never_decides_correctness():
    wrong_steps_right_box = RewardSample(response=r"3 * 5 = 15. 15 + 9 = 24. \boxed{23}", answer="23", task="word_problem", reference=REF, group_id="g")
    misread = RewardSample(response=r"3 * 5 = 15. 15 + 9 = 24. \boxed{24}", answer="23", task="word_problem", reference=REF, group_id="g")
    cfg = {"workers": 0, "always": ["step_match"], "components": {
        "math_accuracy": {"fn": "math_accuracy", "weight": 1.0},
        "step_match": {"fn": "step_match", "weight": 0.5},
    }, "routing": {"word_problem": ["math_accuracy"]}}
    with RewardStack.from_config(cfg) as stack:
        right, wrong = stack.score([wrong_steps_right_box, misread])
    assert right.correct is True and wrong.correct is False
    assert wrong.components["step_match"] == pytest.approx(4 / 6)
    assert wrong.total == pytest.approx(0.5 * 4 / 6)
    assert right.total == pytest.approx(1.0 + 0.5 * 4 / 6)

"""Reading the computations of a worked solution, against hand checks and the task world."""

import random
from fractions import Fraction

import pytest

from vlrl.data.synth import reasoning, text
from vlrl.worked_steps import computations, exact_value

REF = r"3 * 5 = 15. 15 + 8 = 23. \boxed{23}"


@pytest.mark.parametrize(
    "solution, expected",
    [
        (REF, [("*", True), ("+", True)]),
        (r"3 * 5 = 16. 16 + 8 = 24. \boxed{24}", [("*", False), ("+", True)]),  # a slip, then right arithmetic on it
        (r"10 / 4 = 2.5. 2 + 3 * 4 = 14 = 7 * 2. \boxed{14}", [("/", True), ("+*", True)]),  # exact division, precedence, a chain
        (r"(2 + 3) * 4 = 20. 7 × 3 = 21. 8 ÷ 2 = 5. \boxed{5}", [("+*", True), ("*", True), ("/", False)]),
        (r"6 * 10 = 60 = 60 = 61. 60 = 60. \boxed{60}", [("*", False)]),  # a chain is one; "60 = 60" computes nothing
        (r"-3 + 5 = 2. \boxed{2}", [("+", True)]),  # a sign is not an operator
        (r"10 / 3 = 3.33. 10 / 3 = 3.3. 10 / 3 = 3.4. 2 / 3 = 0.667. \boxed{3.33}", [("/", True), ("/", True), ("/", False), ("/", True)]),  # rounded as written
        (r"cup = 5. x = 3 + 4. \boxed{5}", []),  # labels: nothing to check
        (r"4 / 0 = 1. 2 ** 9 = 512. __import__(1) = 1. \boxed{1}", []),  # not arithmetic we check, never run as code
        (r"I get 7. \boxed{3 + 4 = 8}", []),  # only the steps before the box count
    ],
)
def test_computations_hand_checked(solution, expected):
    assert [(c.ops, c.holds) for c in computations(solution)] == expected


def test_operands_are_kept_as_written():
    first, second = computations(r"12 * 3 = 36. 36 - 1.5 = 34.5. \boxed{34.5}")
    assert (first.operands, second.operands) == (("12", "3"), ("36", "1.5"))


def test_exact_values():
    assert exact_value("1 / 3 + 1 / 6") == exact_value("0.5")
    assert exact_value("0.1 + 0.2") == exact_value("0.3")  # exact, not floating point
    assert exact_value("0.12345678901234567891") - exact_value("0.1234567890123456789") == Fraction(1, 10**20)  # literals as written
    assert exact_value("2 ** 3") is None and exact_value("") is None and exact_value("a + 1") is None


def test_runaway_expressions_are_not_steps():
    assert exact_value(" + ".join(["1"] * 40)) == 40  # 159 characters
    assert exact_value(" + ".join(["1"] * 2000)) is None  # past MAX_EXPRESSION: never parsed
    assert exact_value("(" * 150 + "1" + ")" * 40) is None  # unbalanced: a syntax error, not a crash
    assert computations("(" * 90 + "1" + ")" * 90 + " + 1 = 2. \\boxed{2}")[0].holds


def test_every_task_world_reference_holds_and_a_slip_does_not():
    rng = random.Random(1)
    seen = 0
    for difficulty in (1, 2, 3, 4, 5):
        for gen in (reasoning.arith, reasoning.word_problem, text.text_arith):
            target = gen(rng, difficulty).target
            steps = computations(target)
            assert all(c.holds for c in steps), target
            if steps:
                seen += 1
                result = target.split("=", 1)[1].split(".", 1)[0].strip()
                slipped = target.replace(f"= {result}.", f"= {int(result) + 1}.", 1)
                assert not computations(slipped)[0].holds, slipped
    assert seen >= 12

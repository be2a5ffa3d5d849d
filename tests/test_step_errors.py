"""The eval's worked-step diagnosis against hand counts."""

import pytest

from vlrl.step_errors import diagnose

REF = r"3 * 5 = 15. 15 + 8 = 23. \boxed{23}"


def test_diagnose_hand_counted():
    rows = [
        ("word_problem", REF, REF, True),  # read and computed right
        ("word_problem", r"5 * 3 = 15. 15 + 9 = 24. \boxed{24}", REF, False),  # values read (any order), then a misread 9: all hold
        ("word_problem", r"3 * 5 = 16. 16 + 8 = 24. \boxed{24}", REF, False),  # read right, slipped
        ("word_problem", r"3 * 6 = 19. \boxed{19}", REF, False),  # misread and slipped
        ("word_problem", r"\boxed{7}", REF, False),  # no steps
        ("arith", r"1 + 2 = 3. \boxed{3}", r"1 + 2 = 3. \boxed{3}", True),
        ("read_digits", r"\boxed{12}", r"\boxed{12}", True),  # no computation in the reference: not counted
        ("arith", r"1 + 2 = 3. \boxed{3}", None, True),  # no reference: not counted
    ]
    out = diagnose(rows)
    assert list(out) == ["arith", "word_problem"]
    wp = out["word_problem"]
    assert (wp.n, wp.values_read, wp.computed) == (5, 3, 2)
    assert (wp.wrong, wp.wrong_slip, wp.wrong_steps_hold, wp.wrong_no_steps) == (4, 2, 1, 1)
    assert out["arith"].model_dump() == {"n": 1, "values_read": 1, "computed": 1, "wrong": 0, "wrong_slip": 0, "wrong_steps_hold": 0, "wrong_no_steps": 0}


def test_nothing_to_diagnose_without_worked_references():
    assert diagnose([("read_word", r"\boxed{cat}", r"\boxed{cat}", True)]) == {}


@pytest.mark.parametrize("response", [r"2 + 1 = 3. \boxed{3}", r"1 + 2 = 3 = 3. \boxed{3}"])
def test_the_first_values_match_in_either_order_and_a_chain_counts_once(response):
    st = diagnose([("arith", response, r"1 + 2 = 3. \boxed{3}", True)])["arith"]
    assert (st.values_read, st.computed) == (1, 1)

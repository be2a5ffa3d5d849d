"""The masked-truncation warning (rlhf/health.py): when it speaks, when it stays quiet,
and that an RL stage whose responses all hit max_tokens says so in its DONE summary."""

from __future__ import annotations

import functools
import json

import pytest

from rlhf.health import TruncationWatch, length_is_penalised
from vlrl.recipe_rl import RewardTermSpec
from test_rl_stage import _run, build_micro_start, rl_recipe


def test_warns_once_when_the_window_mean_reaches_the_threshold():
    w = TruncationWatch(masked=True, penalised=False, max_tokens=48, threshold=0.5, window=3)
    out = [w.update(s, f) for s, f in enumerate([0.2, 0.4, 0.6, 0.8, 1.0], 1)]
    assert out[:3] == [None, None, None]  # mean 0.4 < 0.5
    assert out[3] is not None and out[4] is None  # mean 0.6 at step 4; said once only
    assert "rl step 4" in out[3] and "60%" in out[3] and "max_tokens (48)" in out[3] and "overlong" in out[3]


def test_the_window_mean_not_a_single_step_decides():
    w = TruncationWatch(masked=True, penalised=False, max_tokens=16, threshold=0.5, window=3)
    assert [w.update(s, f) for s, f in enumerate([0.0, 0.0, 1.0, 0.0, 0.0], 1)] == [None] * 5


@pytest.mark.parametrize("masked, penalised", [(False, False), (True, True), (False, True)])
def test_quiet_unless_masked_and_unpenalised(masked, penalised):
    w = TruncationWatch(masked=masked, penalised=penalised, max_tokens=16, threshold=0.25, window=2)
    assert [w.update(s, 1.0) for s in range(1, 6)] == [None] * 5


def test_missing_metric_and_bad_settings():
    w = TruncationWatch(masked=True, penalised=False, max_tokens=16, window=1)
    assert w.update(1, None) is None and w.update(2, 0.3) is not None
    with pytest.raises(ValueError, match="threshold"):
        TruncationWatch(masked=True, penalised=False, max_tokens=16, threshold=0.0)
    with pytest.raises(ValueError, match="window"):
        TruncationWatch(masked=True, penalised=False, max_tokens=16, window=0)


def test_length_penalties_are_found_in_terms_and_in_the_stack():
    assert not length_is_penalised({}, {})  # the built-in accuracy + format stack
    assert length_is_penalised({"overlong": RewardTermSpec(weight=1.0, args={"max_length": 48, "cache": 8})}, {})
    assert not length_is_penalised({"overlong": RewardTermSpec(weight=0.0)}, {})  # logged only
    assert length_is_penalised({"len": RewardTermSpec(fn="group_length", weight=0.5)}, {})
    assert not length_is_penalised({"diversity": RewardTermSpec(weight=1.0)}, {})
    stack = {"components": {"acc": {"fn": "math_accuracy"}, "long": {"fn": "overlong", "weight": 0.5, "args": {"max_length": 16, "cache": 4}}}}
    assert length_is_penalised({}, stack)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return build_micro_start(tmp_path_factory.mktemp("rlstart"))


def test_a_stage_whose_responses_all_truncate_warns_in_its_summary(start, tmp_path, monkeypatch):
    import rlhf.stage

    monkeypatch.setattr(rlhf.stage, "TruncationWatch", functools.partial(TruncationWatch, window=2))
    data, ckpt = start
    algo = {"mask_truncated": True}
    out = _run(rl_recipe(tmp_path / "cut", data, ckpt, steps=2, rollout={"max_tokens": 1}, algo=algo))
    done = json.loads((out / "DONE.json").read_text())
    warnings = json.dumps(done)
    assert "rl step 2: 100% of the responses" in warnings and "rollout.max_tokens (1)" in warnings

    terms = {"overlong": {"weight": 1.0, "args": {"max_length": 1, "cache": 1}}}
    out = _run(rl_recipe(tmp_path / "pen", data, ckpt, steps=2, rollout={"max_tokens": 1}, algo=algo, reward_terms=terms))
    assert "rl step" not in json.dumps(json.loads((out / "DONE.json").read_text()))


def test_a_stage_whose_cap_is_below_its_prompts_references_says_so_at_the_start(start, tmp_path, capsys):
    """Every micro prompt's reference is longer than 1 token: the stage names the share
    and the setting before its first step and keeps it in DONE.json; at a cap that fits
    every reference it says nothing."""
    data, ckpt = start
    out = _run(rl_recipe(tmp_path / "short", data, ckpt, steps=1, rollout={"max_tokens": 1}))
    warnings = json.loads((out / "DONE.json").read_text())["summary"]["warnings"]
    printed = capsys.readouterr().out
    budget = [w for w in warnings if "reference response longer than rollout.max_tokens=1" in w]
    assert len(budget) == 1 and budget[0].startswith("stages.rl: ")
    n, total = budget[0].split("stages.rl: ")[1].split(" prompts")[0].split(" of ")
    assert int(n) == int(total) > 0
    assert "reference response longer than" in printed and printed.index("reference response longer") < printed.index("rl checkpoint")
    out = _run(rl_recipe(tmp_path / "long", data, ckpt, steps=1, rollout={"max_tokens": 200}))
    assert "warnings" not in json.loads((out / "DONE.json").read_text())["summary"]

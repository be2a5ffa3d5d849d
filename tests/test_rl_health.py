"""The RL health warnings (rlhf/health.py): masked-truncation runaway, answer collapse and
failing reward plugins, when they speak, when they stay quiet, and that a stage reports them (DONE summary,
per-step metrics)."""

from __future__ import annotations

import functools
import json

import pytest

from rlhf.health import (
    AnswerCollapseWatch,
    FirstStepCollapseWatch,
    ModeLengthWatch,
    RewardFailureWatch,
    TruncationWatch,
    answer_key,
    first_step_key,
    length_is_penalised,
    route_fns,
    top_share,
)
from rollout.store import RolloutStore
from vlrl.answers import answer_type_for
from vlrl.data.io import load_records, split_path
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


@pytest.mark.parametrize(
    "response, kind, key",
    [
        (r"\boxed{Blue.}", "text", "blue"),
        ("I think\n BLUE ", "text", "blue"),  # last line, as eval reads it
        (r"\boxed{7.0}", "number", "7"),
        (r"\boxed{1,000}", "number", "1000"),
        (r"\boxed{[11, 12, 84, 79]}", "box", "[10, 10, 80, 80]"),  # boxes a pixel or two apart are one answer
        (r"\boxed{[10, 10, 80, 84]}", "box", "[10, 10, 80, 80]"),
        (r"\boxed{no box}", "box", None),
        (r"\boxed{seven}", "number", None),
        ("", "text", None),
    ],
)
def test_answer_key(response, kind, key):
    assert answer_key(response, kind) == key


def test_top_share():
    assert top_share([]) == (None, 0.0)
    assert top_share(["a", "b", "a", None]) == ("a", 0.5)


def _pairs(answers, refs):
    return list(zip(answers, refs))


def test_collapse_warns_once_when_one_answer_takes_over_a_task_whose_references_vary():
    w = AnswerCollapseWatch(window=2, min_responses=8)
    refs = ["cat", "dog", "sun", "tree", "map", "cup", "hat", "pen"]  # each reference answer 12.5%
    assert w.update(1, {"read_word": _pairs(["blue"] * 3 + ["cat", "dog", "sun", "tree", "map"], refs)}) == []  # 8 responses, 38% blue
    out = w.update(2, {"read_word": _pairs(["blue"] * 7 + ["cat"], refs)})  # window: 10 of 16 blue = 62% >= 50% and >= 3 x 12.5%
    assert len(out) == 1
    assert "rl step 2: 62% of the read_word responses of the last 2 steps answer 'blue'" in out[0]
    assert "no reference answer of those prompts covers more than 12%" in out[0]
    assert "rewards.routing.read_word: [answer_match, format]" in out[0] and "perception_anchor" in out[0]
    assert w.update(3, {"read_word": _pairs(["blue"] * 8, refs)}) == []  # said once per task


def test_collapse_under_the_exact_verdict_points_at_the_anchor_not_the_routing():
    """Without the anchor, read_word went to one answer under answer_match too (the tiny
    recipe's hybrid ablation, docs/rl-stage.md): telling that run to route read_word to
    answer_match, which it already did, sends the user nowhere."""
    exact = {"workers": 0, "routing": {}, "default_route": ["answer_match", "format"]}
    partial = {"workers": 0}  # the built-in routing: read_word on ocr_similarity
    assert route_fns(exact, "read_word") == ["answer_match", "format"]
    assert route_fns(partial, "read_word") == ["ocr_similarity", "format"]
    assert route_fns({"components": {"acc": {"fn": "answer_match"}}, "always": ["acc"]}, "bbox") == ["answer_match", "answer_match"]
    refs = [f"word{i}" for i in range(8)]
    said = {}
    for name, rewards in (("exact", exact), ("partial", partial)):
        w = AnswerCollapseWatch(window=1, min_responses=8, route=functools.partial(route_fns, rewards))
        (said[name],) = w.update(1, {"read_word": _pairs(["green"] * 8, refs)})
    assert "already scored by the eval's exact verdict (answer_match)" in said["exact"]
    assert "rewards.routing" not in said["exact"] and "perception_anchor" in said["exact"]
    assert "rewards.routing.read_word: [answer_match, format]" in said["partial"] and "already scored" not in said["partial"]


def test_collapse_is_quiet_where_the_references_are_as_concentrated():
    # "3" in 70% of responses is a collapse only if the references are far more spread
    w = AnswerCollapseWatch(window=1, min_responses=10)
    assert w.update(1, {"count_shapes": _pairs(["3"] * 7 + ["1"] * 3, ["3"] * 3 + ["1"] * 4 + ["2"] * 3)}) == []  # 70% < 3 x 40%
    assert w.update(2, {"count_shapes": _pairs(["3"] * 7 + ["1"] * 3, ["3"] * 2 + ["1"] * 2 + ["2"] * 2 + ["4"] * 2 + ["5"] * 2)}) != []  # 70% >= 3 x 20%


def test_collapse_needs_enough_responses_and_ignores_unreadable_answers():
    w = AnswerCollapseWatch(window=3, min_responses=30)
    refs = [str(i) for i in range(10)]
    assert w.update(1, {"arith": _pairs(["4"] * 10, refs)}) == []  # all "4", but 10 < 30 responses
    assert w.update(2, {"arith": _pairs([None] * 10, refs)}) == []  # 20 < 30
    assert w.update(3, {"arith": _pairs([None] * 10, refs)}) == []  # 30: two thirds unreadable is not one answer, "4" is 33%
    with pytest.raises(ValueError):
        AnswerCollapseWatch(share=0.0)
    with pytest.raises(ValueError):
        AnswerCollapseWatch(ratio=0.5)


def test_first_step_key_is_the_first_computation_as_written():
    assert first_step_key(r"6 +  2 = 8. 8 * 3 = 24. \boxed{24}") == "6 + 2 = 8"
    assert first_step_key(r"cup = 5. 5 - 1 = 4. \boxed{4}") == "5 - 1 = 4"  # a label computes nothing
    assert first_step_key(r"\boxed{4}") is None


def test_first_step_collapse_warns_at_a_quarter_and_names_the_step():
    """The measured hack: one memorised equation opens most responses while the answers vary."""
    w = FirstStepCollapseWatch(window=2, min_responses=8)
    refs = [f"{i} + {i + 1} = {2 * i + 1}" for i in range(8)]  # each reference first step 12.5%
    assert w.update(1, {"arith": _pairs(["6 + 2 = 8"] * 2 + refs[:6], refs)}) == []  # 25%, but 25% < 3 x 12.5%
    out = w.update(2, {"arith": _pairs(["6 + 2 = 8"] * 6 + refs[:2], refs)})  # window: 8 of 16 = 50% >= 25% and >= 37.5%
    assert len(out) == 1
    assert out[0].startswith("rl step 2: 50% of the arith responses of the last 2 steps begin with '6 + 2 = 8'")
    assert "step_match" in out[0] and "answer" not in out[0].split("begin with")[0]
    assert w.update(3, {"arith": _pairs(["6 + 2 = 8"] * 8, refs)}) == []  # once per task
    quiet = FirstStepCollapseWatch(window=1, min_responses=8)
    assert quiet.update(1, {"arith": _pairs([None] * 8, refs)}) == []  # no computation at all is not one computation


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


def test_a_stage_logs_each_tasks_top_answer_share_as_its_rollouts_show_it(start, tmp_path):
    """answers/top_share/<task> per step = the share of the commonest answer among that
    step's stored responses of the task, recomputed here from the rollout store."""
    data, ckpt = start
    out = _run(rl_recipe(tmp_path / "shares", data, ckpt, steps=2))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with RolloutStore(out / "rollouts.sqlite", readonly=True) as store:
        rows = store.query(limit=10_000)
    checked = 0
    for m in metrics:
        step_rows = [r for r in rows if r.step == m["step"] - 1]
        for task in {r.task for r in step_rows}:
            keys = [answer_key(r.response, answer_type_for(r.task)) for r in step_rows if r.task == task]
            assert m[f"answers/top_share/{task}"] == pytest.approx(top_share(keys)[1])
            checked += 1
    assert checked >= 2

    records = {r.id: r for r in load_records(split_path(data, "train"))}
    worked = 0
    for m in metrics:
        step_rows = [r for r in rows if r.step == m["step"] - 1 and first_step_key(records[r.record_id].target_text() or "")]
        for task in {r.task for r in step_rows}:
            keys = [first_step_key(r.response) for r in step_rows if r.task == task]
            assert m[f"steps/top_share/{task}"] == pytest.approx(top_share(keys)[1])
            worked += 1
        assert not {k for k in m if k.startswith("steps/top_share/")} - {f"steps/top_share/{r.task}" for r in step_rows}
    assert worked >= 1


@pytest.mark.parametrize(
    "pairs_method, watch, collapsed, said",
    [
        ("_answer_pairs", AnswerCollapseWatch, {"read_word": [("blue", f"word{i}") for i in range(8)]},
         "rl step 1: 100% of the read_word responses of the last 1 steps answer 'blue'"),
        ("_first_step_pairs", FirstStepCollapseWatch, {"arith": [("6 + 2 = 8", f"{i} + 1 = {i + 1}") for i in range(8)]},
         "rl step 1: 100% of the arith responses of the last 1 steps begin with '6 + 2 = 8'"),
    ],
)
def test_a_stage_reports_a_collapse_in_its_summary(start, tmp_path, monkeypatch, capsys, pairs_method, watch, collapsed, said):
    """Each collapse watch's warning reaches the console and DONE.json, once, like the
    truncation one, and the console shows it whole: rich read the advice's
    "[answer_match, format]" as markup and printed "rewards.routing.read_word: )". The
    stage's own pairs are replaced by a collapsed set (the micro model is too small to
    collapse in two steps); the pairs' computation is checked by the test above."""
    import rlhf.stage

    monkeypatch.setattr(rlhf.stage.Controller, pairs_method, lambda self, groups: collapsed)
    monkeypatch.setattr(rlhf.stage, watch.__name__, functools.partial(watch, window=2, min_responses=8))
    data, ckpt = start
    out = _run(rl_recipe(tmp_path / "collapse", data, ckpt, steps=3))
    warnings = json.loads((out / "DONE.json").read_text())["summary"]["warnings"]
    collapses = [w for w in warnings if " responses of the last " in w]
    assert len(collapses) == 1 and collapses[0].startswith(said)
    if watch is AnswerCollapseWatch:  # the micro recipe keeps the built-in routing: read_word on ocr_similarity
        assert "rewards.routing.read_word: [answer_match, format]" in collapses[0]
    shown = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert " ".join(collapses[0].split()) in shown


def test_a_failing_reward_component_is_named_once_with_its_cause_and_share():
    w = RewardFailureWatch()
    said = w.update(1, [{"mine": "ValueError: boom"}, {}, {"mine": "ValueError: boom", "judge": "timeout: no result within 5s"}, {}])
    assert said == [
        "rl step 1: reward component 'judge' failed on 1 of 4 samples, which got its fallback value instead: timeout: no result within 5s "
        "(every step's count: reward/judge/fail_count; each sample's cause: the rollouts' error)",
        "rl step 1: reward component 'mine' failed on 2 of 4 samples, which got its fallback value instead: ValueError: boom "
        "(every step's count: reward/mine/fail_count; each sample's cause: the rollouts' error)",
    ]
    assert w.update(2, [{"mine": "ValueError: boom"}]) == [] and w.update(3, [{}]) == []


def test_a_stage_whose_reward_plugin_fails_says_so_and_finishes(start, tmp_path, capsys):
    """The failing plugin costs its own value, not the run: the stage completes, and the
    console and DONE.json name the component and the cause once."""
    plugin = tmp_path / "mine.py"
    plugin.write_text("def boom(sample) -> float:\n    raise ValueError('boom in my plugin')\n")
    data, ckpt = start
    rewards = {"workers": 0, "components": {"acc": {"fn": "answer_match"}, "mine": {"fn": f"{plugin}:boom"}}}
    out = _run(rl_recipe(tmp_path / "fails", data, ckpt, steps=2, rewards=rewards))
    warnings = json.loads((out / "DONE.json").read_text())["summary"]["warnings"]
    failed = [w for w in warnings if "reward component" in w]
    assert len(failed) == 1 and failed[0].startswith("rl step 1: reward component 'mine' failed on 16 of 16 samples")
    assert "ValueError: boom in my plugin" in failed[0] and "reward component 'mine'" in capsys.readouterr().out


def _mode_step(short: float | None, long: float | None) -> dict[str, float]:
    m = {"mode/short/frac": 0.5, "mode/long/frac": 0.5}
    m.update({k: v for k, v in (("mode/short/length_mean", short), ("mode/long/length_mean", long)) if v is not None})
    return m


def test_mode_watch_warns_when_the_short_mode_is_as_long_as_the_long_one():
    """The tiny hybrid ablation's modes: 15.1 tokens in both for 150 steps (the suffixes were
    never in SFT), and the RL on those prompts cost 5 points of reasoning."""
    w = ModeLengthWatch({"long": 64, "short": 32}, window=3)
    assert [w.update(s, _mode_step(15.0, 16.0)) for s in (1, 2)] == [None, None]  # window not full yet
    assert w.update(3, _mode_step(None, 16.0)) is None  # a step without short prompts does not count
    said = w.update(4, _mode_step(15.3, 15.2))
    assert said.startswith("rl step 4: over the last 3 steps, responses in mode 'short' (cap 32) average 15.1 tokens")
    assert "mode 'long' (cap 64) 15.7" in said and "drop rollout.modes" in said
    assert w.update(5, _mode_step(15.0, 15.0)) is None  # said once


@pytest.mark.parametrize("modes, steps", [
    ({"short": 32, "long": 64}, [(8.0, 20.0)] * 5),  # the policy follows them: short answers are shorter
    ({"short": 32, "long": 64}, [(17.9, 20.0)] * 5),  # just under 0.9 of the long mode's length
    ({"only": 32}, [(15.0, 15.0)] * 5),  # one mode: nothing to compare
    ({"a": 32, "b": 32}, [(15.0, 15.0)] * 5),  # equal caps: no short and long
])
def test_mode_watch_is_quiet_when_the_modes_differ_or_cannot_be_compared(modes, steps):
    w = ModeLengthWatch(modes, window=3)
    names = sorted(modes, key=modes.get)
    for i, (a, b) in enumerate(steps):
        assert w.update(i + 1, {f"mode/{names[0]}/length_mean": a, f"mode/{names[-1]}/length_mean": b}) is None
    with pytest.raises(ValueError):
        ModeLengthWatch(modes, ratio=0.0)


def test_a_stage_with_modes_reports_the_mode_warning(start, tmp_path, monkeypatch):
    """The stage feeds each step's metrics to the watch and keeps its warning (a lax ratio:
    the micro model's two modes are not about the cap it sees)."""
    import rlhf.stage

    monkeypatch.setattr(rlhf.stage, "ModeLengthWatch", functools.partial(ModeLengthWatch, window=2, ratio=0.01))
    data, ckpt = start
    modes = [{"name": "short", "suffix": "Answer briefly.", "max_tokens": 4}, {"name": "long", "suffix": "Think step by step.", "max_tokens": 16}]
    out = _run(rl_recipe(tmp_path / "modes", data, ckpt, steps=3, rollout={"modes": modes, "prompts_per_step": 8}))
    warnings = json.loads((out / "DONE.json").read_text())["summary"]["warnings"]
    said = [w for w in warnings if "does not follow the modes' suffixes" in w]
    assert len(said) == 1 and "mode 'short' (cap 4)" in said[0] and "mode 'long' (cap 16)" in said[0]

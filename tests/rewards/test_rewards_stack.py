"""The hybrid combiner: routing, weights, gating, standardisation, fallbacks, metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vlrl.errors import DataError, RecipeError

from rewards import RewardSample, RewardStack, RewardStackConfig

P = str(Path(__file__).with_name("rewards_sample_plugins.py").resolve())


def S(response, answer=None, **kw):
    return RewardSample(response=response, answer=answer, **kw)


def local(cfg: dict) -> RewardStack:
    return RewardStack.from_config({"workers": 0, **cfg})


def test_routing_by_task_record_and_always():
    cfg = {
        "components": {"acc": "exact_match", "fmt": {"fn": "format", "weight": 0.5}, "len": {"fn": f"{P}:length_bonus", "weight": 2.0}},
        "routing": {"shape_color": ["acc", "fmt"]},
        "default_route": ["fmt"],
        "always": ["len"],
    }
    with local(cfg) as st:
        r1, r2, r3 = st.score([S(r"\boxed{red}", "red", task="shape_color"), S("plain", task="other"), S(r"\boxed{x}", "x", task="shape_color", rewards=["acc"])])
    assert set(r1.components) == {"acc", "fmt", "len"}
    # total = 1*1 + 0.5*1 + 2*(0.1*1 word)
    assert r1.total == pytest.approx(1 + 0.5 + 0.2)
    assert r1.contributions == pytest.approx({"acc": 1.0, "fmt": 0.5, "len": 0.2})
    assert set(r2.components) == {"fmt", "len"} and r2.total == pytest.approx(0.2)
    assert set(r3.components) == {"acc", "len"}  # the record's own list wins over routing


def test_components_without_routing_apply_to_everything():
    cfg = RewardStackConfig.model_validate({"components": {"a": "exact_match"}})
    assert cfg.routing == {} and cfg.default_route is None
    with local({"components": {"a": "exact_match"}}) as st:
        assert set(st.score([S("x", "x", task="arith")])[0].components) == {"a"}


def test_default_config_is_the_task_world_stack():
    cfg = RewardStackConfig()
    assert cfg.routing["arith"] == ["math_accuracy", "format"]
    assert cfg.components["format"].weight == 0.2


@pytest.mark.parametrize(
    "cfg, msg",
    [
        ({"components": {"a": "exact_match"}, "routing": {"t": ["b"]}}, "unknown component"),
        ({"components": {"a": "exact_match"}, "gates": {"g": {"rule": "a", "model": "m"}}}, "no component named 'm'"),
        ({"components": {"a": "no_such_plugin"}}, "unknown reward plugin"),
        ({"components": {"a": {"fn": "exact_match", "args": {"typo": 1}}}}, "unknown option"),
        ({"components": {"a": {"fn": "overlong", "args": {"max_length": 10, "cache": 20}}}}, "cache <= max_length"),
        ({"components": {"a": {"fn": "format", "wieght": 1}}}, "wieght"),
        ({"components": {"a": {"fn": "format", "args": {"think": "sometimes"}}}}, "think must be"),
    ],
)
def test_config_errors_name_the_problem(cfg, msg):
    with pytest.raises(RecipeError, match=msg):
        RewardStack.from_config(cfg)


def test_schema_errors_are_one_line_naming_the_key():
    with pytest.raises(RecipeError) as e:
        RewardStack.from_config({"components": {"a": {"fn": "format", "wieght": 1}}, "timeout": 0})
    assert str(e.value) == "rewards.components.a.wieght: unknown key (got 1) [+1 more error(s)]"


def test_unknown_record_component_is_a_data_error():
    with local({"components": {"a": "exact_match"}}) as st, pytest.raises(DataError, match="rec7"):
        st.score([S("x", id="rec7", rewards=["zzz"])])


def test_named_components_and_sub_weights():
    with local({"components": {"p": {"fn": f"{P}:parts", "weight": 2.0, "sub_weights": {"b": 2.0}}}}) as st:
        r = st.score([S("x")])[0]
    assert r.components == {"p/a": 1.0, "p/b": 0.5, "p/c": None, "p": 2.0}  # 1 + 2*0.5
    assert r.total == pytest.approx(4.0)


def test_gating_uses_the_rule_where_it_decides_and_the_model_elsewhere():
    cfg = {
        "components": {"rule": {"fn": f"{P}:maybe", "correct_at": 1.0}, "model": {"fn": f"{P}:fake_model", "isolate": False}},
        "gates": {"acc": {"rule": "rule", "model": "model", "weight": 1.0, "model_correct_at": 1.0}},
        "default_route": ["acc"],
        "routing": {},
    }
    with local(cfg) as st:
        calls = _calls_of(st)
        calls.clear()
        rs = st.score([S("4", "4"), S("5", "4"), S("open", "an essay")])
    assert rs[0].components["acc"] == 1.0 and rs[1].components["acc"] == 0.0
    assert rs[2].components["acc"] == 4.0  # len("open") from the model
    assert calls == ["open"]  # the model saw only the undecided sample
    assert [r.total for r in rs] == [1.0, 0.0, 4.0]
    assert "rule" not in rs[0].contributions  # gate inputs count through the gate only
    assert [r.correct for r in rs] == [True, False, True]


def _calls_of(stack):
    import sys

    mod = sys.modules[stack.components["model"].spec.obj.__module__]
    return mod.CALLS


def test_standardise_model_scores_within_the_group():
    cfg = {
        "components": {"m": {"fn": f"{P}:fake_model", "weight": 0.5}, "acc": "exact_match"},
        "standardize_model_scores": True,
    }
    with local(cfg) as st:
        rs = st.score([S("a", "a", group_id="g"), S("abc", "a", group_id="g"), S("zz", "zz", group_id="h")])
    # group g: lengths 1, 3 -> mean 2, std 1 -> -1, +1; group h has one member -> 0
    assert [r.components["m"] for r in rs] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-5)
    assert [r.components["m/raw"] for r in rs] == [1.0, 3.0, 2.0]
    assert rs[0].total == pytest.approx(1.0 + 0.5 * -1.0, abs=1e-5)  # MiniCPM-V 4.5: acc + 0.5 x z(RM)


def test_failures_get_the_fallback_and_are_counted():
    hostile = str(Path(__file__).with_name("rewards_hostile_corpus.py").resolve())
    cfg = {"components": {"bad": {"fn": f"{hostile}:raises", "fallback": -1.0}, "ok": f"{hostile}:ok"}, "fallback": 0.0}
    with local(cfg) as st:
        r = st.score([S("a"), S("b")])
        m = st.metrics()
    assert r[0].components["bad"] == -1.0 and "ValueError" in r[0].failures["bad"]
    assert r[0].total == pytest.approx(-1.0 + 1.0)
    assert m["reward/bad/fail_count"] == 2 and m["reward/ok/mean"] == 1.0 and m["reward/fail_count"] == 2


def test_group_terms_see_correctness_of_the_group():
    cfg = {"components": {"acc": "exact_match", "len": "group_length", "conc": "conciseness"}}
    with local(cfg) as st:
        rs = st.score([S("a " * 10 + r"\boxed{x}", "x", group_id="g"), S("a " * 30 + r"\boxed{x}", "x", group_id="g"), S("a " * 20 + r"\boxed{y}", "x", group_id="g")])
    # lengths in words: 11, 31, 21 -> lambda = 0.5, -0.5, 0.0; the wrong one keeps min(0, 0) = 0
    assert [r.components["len"] for r in rs] == pytest.approx([0.5, -0.5, 0.0])
    assert [r.components["conc"] for r in rs] == pytest.approx([0.0, 11 / 31 - 1, 0.0])


def test_async_and_batched_plugins_in_process():
    cfg = {"components": {"a": f"{P}:async_model", "b": {"fn": f"{P}:batched_len", "batch_size": 2}}}
    with local(cfg) as st:
        rs = st.score([S("x"), S("xyz"), S("hello")])
    assert [r.components["a"] for r in rs] == [0.25] * 3
    assert [r.components["b"] for r in rs] == [1.0, 3.0, 5.0]


HANGS = """
import asyncio, time
from rewards import reward

@reward(register=False)
async def blocks_loop(sample) -> float:
    if sample.response == "stuck":
        await asyncio.sleep(0.1)
        time.sleep(3600)  # blocks the event loop: asyncio's own timeout cannot fire
    return 1.0

@reward(register=False, isolate=False)
def hangs_in_process(sample) -> float:
    if sample.response == "stuck":
        time.sleep(3600)
    return 1.0

@reward(register=False, kind="model")
def slow_model(sample) -> float:
    time.sleep(2.0)  # a first call loading its model
    return 0.5
"""


@pytest.mark.timeout(60)
def test_in_process_plugins_that_hang_fail_at_their_timeout(tmp_path):
    f = tmp_path / "hangs.py"
    f.write_text(HANGS)
    with local({"components": {"loop": f"{f}:blocks_loop", "thread": f"{f}:hangs_in_process"}, "timeout": 0.5}) as st:
        t0 = time.perf_counter()
        fine, stuck, after = st.score([S("fine"), S("stuck"), S("after")])
        assert time.perf_counter() - t0 < 5
        assert fine.components == {"loop": 1.0, "thread": 1.0} and not fine.failures
        assert "timeout" in stuck.failures["loop"] and "event loop" in stuck.failures["loop"] and "isolate: true" in stuck.failures["loop"]
        assert "timeout" in stuck.failures["thread"] and "isolate: true" in stuck.failures["thread"]
        assert after.components["loop"] == 1.0 and "not run" in after.failures["thread"]
        again = st.score([S("fine")])[0]  # a fresh loop and thread: the stack goes on
        assert again.components == {"loop": 1.0, "thread": 1.0}


def test_sync_model_plugins_are_waited_for_past_the_timeout(tmp_path):
    f = tmp_path / "hangs.py"
    f.write_text(HANGS)
    with local({"components": {"rm": f"{f}:slow_model"}, "timeout": 0.5}) as st:
        r = st.score([S("x")])[0]
    assert r.components == {"rm": 0.5} and not r.failures


def test_isolated_plugins_run_in_the_pool_processes():
    with RewardStack.from_config({"components": {"pid": f"{P}:pid", "b": f"{P}:batched_len"}, "workers": 2}) as st:
        rs = st.score([S(str(i)) for i in range(40)])
        pids = {r.components["pid"] for r in rs}
        assert pids <= set(map(float, st._pool.pids)) and os.getpid() not in pids
        assert [r.components["b"] for r in rs[:3]] == [1.0, 1.0, 1.0]


def test_closures_cannot_be_isolated():
    from rewards import reward

    @reward(register=False)
    def inner(sample) -> float:
        return 1.0

    from rewards.registry import REGISTRY

    with REGISTRY.scoped():
        REGISTRY.add(inner.__vlrl_reward__)
        with pytest.raises(RecipeError, match="isolate: false"):
            RewardStack.from_config({"components": {"i": "inner"}})
        with RewardStack.from_config({"components": {"i": {"fn": "inner", "isolate": False}}}) as st:
            assert st.score([S("x")])[0].components == {"i": 1.0}


def test_metrics_keys():
    with local({}) as st:
        st.score([S(r"\boxed{2}", "2", task="arith"), S(r"\boxed{3}", "2", task="arith")])
        m = st.metrics()
    for key in ("reward/total/mean", "reward/math_accuracy/mean", "reward/math_accuracy/fail_count", "reward/format/time_s", "reward/correct_rate", "reward/samples_per_s"):
        assert key in m
    assert m["reward/correct_rate"] == 0.5


def test_empty_batch():
    with local({}) as st:
        assert st.score([]) == []
        assert st.metrics()["reward/time_s"] >= 0


def test_with_base_dir_points_relative_plugin_files_at_the_recipe_folder(tmp_path):
    (tmp_path / "mine.py").write_text("def f(sample):\n    return 0.5\n")
    cfg = RewardStackConfig.model_validate({"components": {"a": "mine.py:f", "b": "exact_match", "c": "rewards.rules:iou"}})
    moved = cfg.with_base_dir(tmp_path)
    assert moved.components["a"].fn == f"{tmp_path / 'mine.py'}:f"
    assert moved.components["b"].fn == "exact_match" and moved.components["c"].fn == "rewards.rules:iou"
    assert cfg.components["a"].fn == "mine.py:f"  # the original is not changed
    with RewardStack.from_config(moved.model_copy(update={"workers": 0})) as st:
        assert st.score([S("x")])[0].components["a"] == 0.5


@pytest.mark.parametrize("workers", [0, 1])
def test_values_outside_declared_bounds_fail_the_sample_naming_the_bound(workers):
    """A plugin declaring bounds=(0, 1) that returns 100 fails that sample (fallback, counted),
    in the pool and in-process; each named component and each batch item is checked alone."""
    cfg = {"workers": workers, "components": {"p": f"{P}:percent", "n": f"{P}:named_penalties", "b": f"{P}:batched_len_bounded"}}
    with RewardStack.from_config(cfg) as st:
        good, bad, long = st.score([S("no"), S("ok"), S("x" * 11)])
        m = st.metrics()
    assert good.components["p"] == 0.5 and not good.failures
    assert bad.components["p"] == 0.0 and bad.failures["p"] == "returned 100, outside its bounds [0, 1]"
    assert long.failures["n"] == "returned['b'] 9, outside its bounds [-inf, 0]"
    assert long.failures["b"] == "returned 11, outside its bounds [0, 10]" and long.components["b"] == 0.0
    assert "b" not in bad.failures and bad.components["b"] == 2.0
    assert m["reward/p/fail_count"] == 1 and m["reward/n/fail_count"] == 1 and m["reward/b/fail_count"] == 1


def test_a_recipe_sets_or_overrides_bounds_and_bad_bounds_name_the_key():
    cfg = {"components": {"p": {"fn": f"{P}:percent", "bounds": [0, 100]}, "len": {"fn": f"{P}:length_bonus", "bounds": [None, 0.05]}}}
    with local(cfg) as st:
        r = st.score([S("ok")])[0]
    assert r.components["p"] == 100.0 and "p" not in r.failures  # the recipe widened the plugin's bounds
    assert r.failures["len"] == "returned 0.1, outside its bounds [-inf, 0.05]"  # and bounded a plugin that declared none
    for bounds, msg in (([1, 0], "lo 1 is above hi 0"), ([0], "expected two numbers"), (["a", 1], "'a' is not a number")):
        with pytest.raises(RecipeError) as e:
            local({"components": {"p": {"fn": f"{P}:percent", "bounds": bounds}}})
        assert str(e.value).startswith("rewards.components.p.bounds: ") and msg in str(e.value), str(e.value)


def test_built_ins_declare_their_bounds():
    from rewards.registry import REGISTRY

    assert REGISTRY.resolve("answer_match").bounds == (0.0, 1.0) and REGISTRY.resolve("overlong").bounds == (-1.0, 0.0)
    with pytest.raises(Exception, match=r"bounds \(2, 1\): lo 2 is above hi 1"):
        from rewards.api import reward

        reward(register=False, bounds=(2, 1))(lambda sample: 0.0)

"""Hybrid RL terms (issue 6) through the RL stage on the micro model: at coefficient zero
every term leaves the run bitwise plain GRPO's; all on, each term acts and is logged."""

from __future__ import annotations

import torch

from rollout.store import RolloutStore
from test_rl_stage import _run, _weights, build_micro_start, rl_recipe, run_until_crash
from vlrl.tracking import read_metrics

import pytest

torch.set_num_threads(1)

BASE = {"curriculum": {"perception_share": 0.5}}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return build_micro_start(tmp_path_factory.mktemp("hybstart"))


def _advantages(out):
    with RolloutStore(out / "rollouts.sqlite", readonly=True) as store:
        return [(r.step, r.group_id, r.advantage) for r in store.query(limit=1000)]


def test_every_term_at_zero_is_plain_grpo_bitwise(start, tmp_path):
    data, ckpt = start
    plain = _run(rl_recipe(tmp_path / "plain", data, ckpt, **BASE))
    zero = _run(rl_recipe(
        tmp_path / "zero", data, ckpt, **BASE,
        algo={"perception_anchor": {"kl_coef": 0.0}, "visual": {"coef": 0.0, "metric": True}},
        reward_terms={"diversity": {"weight": 0.0}, "conciseness": {"weight": 0.0}},
    ))
    a, b = _weights(plain / "checkpoint"), _weights(zero / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _advantages(plain) == _advantages(zero)
    m = read_metrics(zero / "metrics.jsonl")
    assert all("visual/dependency" in x and "reward/diversity/mean" in x for x in m)  # measured, not applied
    assert "visual/dependency" not in read_metrics(plain / "metrics.jsonl")[0]


def test_all_terms_on_act_and_are_logged(start, tmp_path):
    data, ckpt = start
    out = _run(rl_recipe(
        tmp_path / "all", data, ckpt, **BASE,
        algo={"perception_anchor": {"kl_coef": 0.2}, "visual": {"coef": 0.5, "cap": 0.5, "correct_only": False}},
        reward_terms={"diversity": {"weight": 0.1}, "conciseness": {"weight": 0.1}},
        rollout={"modes": [{"name": "short", "suffix": "Answer briefly.", "max_tokens": 6}, {"name": "long", "suffix": "Think step by step.", "max_tokens": 16}]},
    ))
    metrics = read_metrics(out / "metrics.jsonl")
    for m in metrics:
        for k in ("actor/perception_kl", "visual/dependency", "visual/bonus_mean", "diversity/distinct_2", "diversity/single_pattern_frac",
                  "reward/diversity/mean", "reward/conciseness/mean", "mode/short/frac"):
            assert k in m, k
        assert m["actor/perception_kl"] >= 0 and 0 <= m["diversity/distinct_2"] <= 1
        assert m.get("mode/short/length_mean", 0) <= 6 and m.get("mode/long/length_mean", 0) <= 16
    assert any(m["visual/bonus_mean"] > 0 for m in metrics)  # unconditioned bonus: some image row depends on its image
    assert any(m["actor/perception_kl"] > 0 for m in metrics[1:])  # the policy moved on perception prompts
    with RolloutStore(out / "rollouts.sqlite", readonly=True) as store:
        rows = store.query(limit=1000)
    assert all("diversity" in r.components and "conciseness" in r.components for r in rows)
    assert undocumented_hybrid(metrics) == []


def undocumented_hybrid(metrics):
    from test_rl_stage import undocumented

    named = [{k.replace("mode/short/", "mode/<name>/").replace("mode/long/", "mode/<name>/"): v for k, v in m.items()} for m in metrics]
    return undocumented(named)


ALL_ON = dict(
    algo={"perception_anchor": {"kl_coef": 0.2}, "visual": {"coef": 0.5, "correct_only": False, "min_entropy": 0.01}},
    reward_terms={"diversity": {"weight": 0.1}, "conciseness": {"weight": 0.1}},
    rollout={"modes": [{"name": "short", "suffix": "Answer briefly.", "max_tokens": 6}, {"name": "long", "suffix": "Think step by step.", "max_tokens": 16}]},
)


def test_resume_with_every_term_on_replays_exactly(start, tmp_path, monkeypatch):
    """Modes, anchor rows and the visual bonus are pure in (seed, step, prompt number):
    a run killed after its step-2 checkpoint ends bitwise equal to an uninterrupted one."""
    data, ckpt = start
    ref = _run(rl_recipe(tmp_path / "ref", data, ckpt, steps=4, **BASE, **ALL_ON))
    raw = rl_recipe(tmp_path / "killed", data, ckpt, steps=4, **BASE, **ALL_ON)
    run_until_crash(monkeypatch, raw)
    killed = _run(raw)
    a, b = _weights(ref / "checkpoint"), _weights(killed / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with RolloutStore(ref / "rollouts.sqlite", readonly=True) as s1, RolloutStore(killed / "rollouts.sqlite", readonly=True) as s2:
        r1 = sorted((r.step, r.group_id, r.sample_index, r.response, r.advantage) for r in s1.query(limit=1000))
        r2 = sorted((r.step, r.group_id, r.sample_index, r.response, r.advantage) for r in s2.query(limit=1000))
    assert r1 == r2

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


def test_the_anchor_alone_runs_the_reference_on_perception_rows_only(start, tmp_path, monkeypatch):
    """With no KL term the anchor is the reference's only reader: the reference forward
    gets the perception rows alone, and the run comes out as with every row computed (to
    float noise: other rows beside them pad the forward differently, ~1e-6 in a logprob)."""
    from rlhf import stage as stage_mod
    from rlhf.workers import ReferenceWorker

    data, ckpt = start
    algo = {"perception_anchor": {"kl_coef": 0.2}}
    seen: list[int] = []
    full_logprobs = ReferenceWorker.logprobs

    def counting(self, batch):
        seen.append(batch.rows)
        return full_logprobs(self, batch)

    monkeypatch.setattr(ReferenceWorker, "logprobs", counting)
    subset = _run(rl_recipe(tmp_path / "subset", data, ckpt, **BASE, algo=algo))
    rows_per_step = [m["batch/rows"] for m in read_metrics(subset / "metrics.jsonl")]
    assert len(seen) == len(rows_per_step) and all(0 < s < b for s, b in zip(seen, rows_per_step))  # some rows, never all

    seen.clear()
    monkeypatch.setattr(stage_mod.Controller, "_reference_logprobs", lambda self, batch, perception: self.reference.logprobs(batch))
    full = _run(rl_recipe(tmp_path / "full", data, ckpt, **BASE, algo=algo))
    assert seen == rows_per_step
    a, b = _weights(subset / "checkpoint"), _weights(full / "checkpoint")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # 3 AdamW steps at lr 1e-3 move weights ~3e-3
    pkl = [m["actor/perception_kl"] for m in read_metrics(subset / "metrics.jsonl")]
    assert pkl == pytest.approx([m["actor/perception_kl"] for m in read_metrics(full / "metrics.jsonl")], abs=1e-5)
    assert max(pkl) > 0  # the anchor read the reference

"""The rollout store: round trip, filters, sorting, groups, step summaries, atomic batches."""

from __future__ import annotations

import math
import statistics

import pytest
from pydantic import ValidationError

from rollout.store import RolloutQuery, RolloutRow, RolloutStatus, RolloutStore, StoreError


def row(step=0, group="g0", idx=0, *, task="arith", reward=1.0, adv=0.5, tokens=10, comps=None, status="ok", version=None, difficulty=1, **kw):
    return RolloutRow(
        run="r",
        step=step,
        policy_version=step if version is None else version,
        group_id=group,
        sample_index=idx,
        record_id=f"rec-{group}",
        task=task,
        difficulty=difficulty,
        prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"question {group}"}]}],
        images=[f"images/{group}.png"],
        answer="4",
        response=f"answer {step}/{group}/{idx}",
        response_tokens=tokens,
        finish_reason="length" if status == "truncated" else "stop",
        status=RolloutStatus(status),
        components={"accuracy": reward} if comps is None else comps,
        total_reward=reward,
        advantage=adv,
        **kw,
    )


@pytest.fixture
def store(tmp_path):
    s = RolloutStore.in_dir(tmp_path)
    yield s
    s.close()


def fill(store: RolloutStore) -> list[RolloutRow]:
    """3 steps x 2 groups x 3 samples, with varied fields; one append per step."""
    rows = []
    for step in range(3):
        batch = []
        for g in range(2):
            for i in range(3):
                acc = float((step + g + i) % 2)
                comps = {"accuracy": acc, "length": -0.1 * i}
                if i == 1:
                    comps["perception"] = None  # not applicable
                elif i == 2:
                    comps["perception"] = 0.05 * (step + 1)
                batch.append(
                    row(
                        step,
                        f"s{step}g{g}",
                        i,
                        task="arith" if g == 0 else "read_digits",
                        reward=acc + comps["length"],
                        adv=None if (step, g, i) == (0, 0, 0) else acc - 0.5,
                        tokens=10 * (i + 1) + step,
                        comps=comps,
                        status="truncated" if i == 2 and g == 1 else "ok",
                        difficulty=1 + g + step % 2,
                    )
                )
        store.append(batch)
        rows.extend(batch)
    return rows


def test_round_trip_keeps_every_field(store):
    r = row(meta={"mode": "long", "seed": 3}, error=None, comps={"accuracy": 1.0, "format": None})
    (rid,) = store.append([r])
    back = store.get(rid)
    assert back.id == rid
    assert back.model_dump(exclude={"id"}) == r.model_dump(exclude={"id"})
    assert store.component_names() == ["accuracy", "format"]


def test_ids_follow_insertion_order_and_batches_are_recorded(store):
    rows = fill(store)
    got = store.query(limit=100)
    assert [r.id for r in got] == list(range(1, 19))
    assert [r.response for r in got] == [r.response for r in rows]
    assert store.batches() == [(1, 6), (2, 6), (3, 6)]
    assert store.steps() == [0, 1, 2]
    assert store.tasks() == ["arith", "read_digits"]


def test_filters(store):
    rows = fill(store)

    def ids(**f):
        return sorted(r.response for r in store.query(limit=1000, **f))

    def want(pred):
        return sorted(r.response for r in rows if pred(r))

    assert ids(step=1) == want(lambda r: r.step == 1)
    assert ids(steps=(1, None)) == want(lambda r: r.step >= 1)
    assert ids(steps=(None, 0)) == want(lambda r: r.step == 0)
    assert ids(task="read_digits") == want(lambda r: r.task == "read_digits")
    assert ids(task=["arith", "read_digits"]) == want(lambda r: True)
    assert ids(difficulty=[2]) == want(lambda r: r.difficulty == 2)
    assert ids(status="truncated") == want(lambda r: r.status == RolloutStatus.truncated)
    assert ids(policy_version=2) == want(lambda r: r.policy_version == 2)
    assert ids(group_id="s1g0") == want(lambda r: r.group_id == "s1g0")
    assert ids(record_id="rec-s2g1") == want(lambda r: r.record_id == "rec-s2g1")
    assert ids(total_reward=(0.5, None)) == want(lambda r: r.total_reward >= 0.5)
    assert ids(advantage=(None, 0.0)) == want(lambda r: r.advantage is not None and r.advantage <= 0.0)
    assert ids(length=(20, 25)) == want(lambda r: 20 <= r.response_tokens <= 25)
    assert ids(components={"accuracy": (1.0, None)}) == want(lambda r: r.components["accuracy"] >= 1.0)
    # a component that is None (not applicable) never matches a range, nor an open one
    assert ids(components={"perception": (None, None)}) == want(lambda r: r.components.get("perception") is not None)
    assert ids(components={"perception": (0.1, 0.1)}) == want(lambda r: r.components.get("perception") == pytest.approx(0.1))
    both = ids(task="arith", steps=(1, 2), components={"accuracy": (1, None), "length": (-0.15, None)})
    assert both == want(lambda r: r.task == "arith" and r.step >= 1 and r.components["accuracy"] >= 1 and r.components["length"] >= -0.15)
    assert ids(components={"nope": (0, 1)}) == []
    assert store.count(task="arith") == 9 and store.count() == 18
    assert store.count(RolloutQuery(components={"accuracy": (1, None)})) == len(want(lambda r: r.components["accuracy"] >= 1))


def test_sorting_by_columns_and_components(store):
    rows = fill(store)
    by_reward = store.query(sort_by="total_reward", descending=True, limit=100)
    assert [r.total_reward for r in by_reward] == sorted((r.total_reward for r in rows), reverse=True)
    # ties are broken by id in the same direction, so pages are stable
    assert all(a.id > b.id for a, b in zip(by_reward, by_reward[1:]) if a.total_reward == b.total_reward)
    by_len = store.query(sort_by="length", limit=100)
    assert [r.response_tokens for r in by_len] == sorted(r.response_tokens for r in rows)
    for descending in (False, True):
        got = store.query(sort_by="perception", descending=descending, limit=100)
        vals = [r.components.get("perception") for r in got]
        present = [v for v in vals if v is not None]
        assert vals[: len(present)] == sorted(present, reverse=descending)  # rows without it come last
        assert all(v is None for v in vals[len(present) :]) and len(vals) == 18
        assert store.query(sort_by="components.perception", descending=descending, limit=100) == got
    adv = [r.advantage for r in store.query(sort_by="advantage", limit=100)]
    assert adv[-1] is None and adv[:-1] == sorted(adv[:-1])  # NULL advantage last
    with pytest.raises(StoreError, match="cannot sort by 'nope'"):
        store.query(sort_by="nope")


def test_pages_cover_everything_once(store):
    fill(store)
    seen = []
    for offset in range(0, 18, 5):
        seen += [r.id for r in store.query(sort_by="accuracy", descending=True, limit=5, offset=offset)]
    assert sorted(seen) == list(range(1, 19))


def test_group_view_and_group_summaries(store):
    rows = fill(store)
    g = store.group("s1g1")
    assert [r.sample_index for r in g] == [0, 1, 2] and {r.group_id for r in g} == {"s1g1"}
    sums = store.groups(1)
    assert [s.group_id for s in sums] == ["s1g0", "s1g1"]
    for s in sums:
        rewards = [r.total_reward for r in rows if r.group_id == s.group_id]
        assert s.n == 3 and s.step == 1
        assert s.reward_mean == pytest.approx(statistics.mean(rewards))
        assert s.reward_std == pytest.approx(statistics.pstdev(rewards))
        assert (s.reward_min, s.reward_max) == (min(rewards), max(rewards))
        assert not s.all_equal
    store.append([row(5, "tie", i, reward=1.0) for i in range(4)])
    (tie,) = store.groups(5)
    assert tie.all_equal and tie.reward_std == 0.0


def test_step_summaries(store):
    rows = fill(store)
    summaries = store.step_summaries()
    assert [s.step for s in summaries] == [0, 1, 2]
    for s in summaries:
        mine = [r for r in rows if r.step == s.step]
        assert s.n == 6 and s.n_groups == 2
        assert s.reward_mean == pytest.approx(statistics.mean(r.total_reward for r in mine))
        assert s.length_mean == pytest.approx(statistics.mean(r.response_tokens for r in mine))
        assert s.truncated == 1 and s.errors == 0
        percep = [r.components["perception"] for r in mine if r.components.get("perception") is not None]
        assert s.components["perception"] == pytest.approx(statistics.mean(percep))
        assert s.components["accuracy"] == pytest.approx(statistics.mean(r.components["accuracy"] for r in mine))
        advs = [r.advantage for r in mine if r.advantage is not None]
        assert s.advantage_mean == pytest.approx(statistics.mean(advs))
    assert [s.step for s in store.step_summaries([2, 0])] == [0, 2]


def test_a_batch_with_a_repeated_sample_is_refused_whole(store):
    store.append([row(0, "g", 0)])
    with pytest.raises(StoreError, match="batch not stored"):
        store.append([row(0, "g", 1), row(0, "g", 2), row(0, "g", 0)])
    assert store.count() == 1 and store.batches() == [(1, 1)]
    store.append([row(0, "g", 1)])  # the store still takes new batches
    assert store.count() == 2


def test_new_components_later_in_the_run_get_their_own_column(store):
    store.append([row(0, "a", 0, comps={"accuracy": 1.0})])
    store.append([row(1, "b", 0, comps={"accuracy": 0.0, "diversity": 0.3})])
    assert store.component_names() == ["accuracy", "diversity"]
    assert [r.group_id for r in store.query(components={"diversity": (0.1, None)})] == ["b"]
    assert store.get(1).components == {"accuracy": 1.0}


def test_discard_after_rewinds_for_resume(store):
    fill(store)
    assert store.discard_after(0) == 12
    assert store.steps() == [0] and store.count() == 6 and store.batches() == [(1, 6)]
    fill_again = [row(1, "s1g0", i) for i in range(3)]
    store.append(fill_again)  # the replayed step fits again
    assert store.count(step=1) == 3


def test_rows_are_validated():
    with pytest.raises(ValidationError, match="relative"):
        RolloutRow(step=0, policy_version=0, group_id="g", prompt=[{"role": "user", "content": "q"}], images=["/abs/x.png"])
    with pytest.raises(ValidationError, match="finite"):
        RolloutRow(step=0, policy_version=0, group_id="g", prompt=[{"role": "user", "content": "q"}], total_reward=math.nan)
    with pytest.raises(ValidationError, match="None"):
        RolloutRow(step=0, policy_version=0, group_id="g", prompt=[{"role": "user", "content": "q"}], components={"a": math.inf})
    with pytest.raises(ValidationError):
        RolloutQuery(limit=0)


def test_read_only_handle_reads_and_refuses_writes(tmp_path):
    with RolloutStore.in_dir(tmp_path) as w:
        fill(w)
    r = RolloutStore.in_dir(tmp_path, readonly=True)
    assert r.count() == 18 and len(r.query(step=2, limit=100)) == 6
    with pytest.raises(StoreError, match="read-only"):
        r.append([row(9, "x", 0)])
    r.close()
    with pytest.raises(StoreError, match="no rollout store"):
        RolloutStore(tmp_path / "missing.sqlite", readonly=True)


def test_the_store_imports_without_verl_or_torch():
    """A vLLM venv without verl imports rollout/; keep the store free of both."""
    import subprocess
    import sys

    code = "import sys, rollout.store; print('verl' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_correct_share_by_step_counts_only_rows_with_a_verdict(store):
    store.append([row(0, "a", 0, meta={"correct": True}), row(0, "a", 1, meta={"correct": False}), row(0, "a", 2, meta={})])
    store.append([row(1, "b", 0, meta={"correct": False}), row(1, "b", 1, meta={"correct": None})])
    store.append([row(2, "c", 0)])
    assert store.correct_share_by_step() == {0: 0.5, 1: 0.0}

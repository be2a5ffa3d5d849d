"""Curriculum mixtures (replay, restore, the shuffled ablation), the record stream, and the
feed's consumed-data tracker: resuming from (cursor, pending) yields the same batches."""

from __future__ import annotations

import pytest
import torch

from sft.curriculum import RecordStream, build_plan, family_shares
from sft.feed import Feed
from vlrl.data.images import RecordDataset
from vlrl.data.synth import make_dataset
from vlrl.errors import VlrlError
from vlrl.model.tiny import build_tiny_model
from vlrl.recipe_sft import PackingSpec, SftStage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    make_dataset(d, seed=3, n=120, n_eval=4)
    return RecordDataset(d / "train.jsonl")


def _cfg(**over) -> SftStage:
    raw = {
        "from": "model", "data": "data",
        "replay": {"general": 0.1, "perception": 0.3},
        "phases": [
            {"name": "easy", "select": {"families": ["reasoning"], "difficulty": [1, 2]}, "steps": 30},
            {"name": "hard", "select": {"families": ["reasoning"], "difficulty": [3, 5]}, "steps": 10},
        ],
    } | over
    return SftStage.model_validate(raw)


def test_each_phase_replays_general_and_perception(data):
    recs = data.records
    plans = build_plan(recs, _cfg(), "stages.sft")
    for plan in plans:
        fam = family_shares(recs, plan)
        assert fam["reasoning"] == pytest.approx(0.6) and fam["text"] == pytest.approx(0.1) and fam["perception"] == pytest.approx(0.3)
    easy = {recs[e].difficulty for e, w in zip(plans[0].entries, plans[0].weights) if recs[e].family == "reasoning"}
    assert easy <= {1, 2}


def test_restore_leans_on_general_data(data):
    plans = build_plan(data.records, _cfg(restore={"steps": 5, "general": 0.6, "perception": 0.2}), "stages.sft")
    assert [p.name for p in plans] == ["easy", "hard", "restore"]
    fam = family_shares(data.records, plans[2])
    assert fam["text"] == pytest.approx(0.6) and fam["perception"] == pytest.approx(0.2)


def test_curriculum_off_is_the_step_weighted_union(data):
    on = build_plan(data.records, _cfg(), "s")
    off = build_plan(data.records, _cfg(curriculum=False), "s")
    assert [p.steps for p in off] == [p.steps for p in on] and [p.optim for p in off] == [p.optim for p in on]
    assert off[0].entries == off[1].entries and off[0].weights == off[1].weights
    hard_share = sum(w for e, w in zip(off[0].entries, off[0].weights) if data.records[e].family == "reasoning" and data.records[e].difficulty >= 3)
    assert hard_share == pytest.approx(0.6 * 10 / 40)  # the hard phase's 60% own share, over a quarter of the budget
    assert sum(off[0].weights) == pytest.approx(1.0)


def test_empty_selection_is_a_one_line_error(data):
    cfg = _cfg(phases=[{"name": "x", "select": {"tasks": ["no_such_task"]}, "steps": 1}])
    with pytest.raises(VlrlError, match=r"stages.sft.phases.0: the phase 'x' selection .* matches no training records"):
        build_plan(data.records, cfg, "stages.sft")


def test_stream_is_a_pure_function_of_seed_phase_position(data):
    plan = build_plan(data.records, _cfg(), "s")[0]
    a = RecordStream(plan, seed=1, phase=0)
    b = RecordStream(plan, seed=1, phase=0)
    assert [a[p] for p in range(600)] == [b[p] for p in range(599, -1, -1)][::-1]
    assert [a[p] for p in range(50)] != [RecordStream(plan, seed=1, phase=1)[p] for p in range(50)]


@pytest.mark.parametrize("packed", [True, False])
def test_feed_resumed_from_its_tracker_yields_the_same_batches(data, packed):
    corpus = [m.parts()[-1].text or "" for r in data.records[:60] for m in r.messages] * 3
    model, processor = build_tiny_model(corpus, preset="micro", seed=0)
    plan = build_plan(data.records, _cfg(), "s")[0]
    spec = PackingSpec(enabled=packed, max_length=256, max_image_tokens=32, lookahead=3)

    def feed(**kw) -> Feed:
        return Feed(data, processor, RecordStream(plan, seed=0, phase=0), batch_size=2, max_length=128, packing=spec,
                    rope_index=model.model.get_rope_index, **kw)

    whole = feed()
    batches = [whole.micro_batch() for _ in range(6)]
    first = feed()
    for _ in range(3):
        first.micro_batch()
    resumed = feed(cursor=first.cursor, pending=list(first.pending))
    for want in batches[3:]:
        got = resumed.micro_batch()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert resumed.cursor == whole.cursor and resumed.pending == whole.pending
    if packed:
        # Every drawn position is trained on exactly once or still pending.
        assert whole.stats.consumed + len(whole.pending) == whole.cursor


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory, data):
    """The stage's data, then a second corpus of reasoning only, read as one list."""
    from vlrl.data.images import RecordDatasets

    d = tmp_path_factory.mktemp("corpus2")
    make_dataset(d, seed=9, n=60, n_eval=4, families_mix={"reasoning": 1.0})
    return RecordDatasets([data, RecordDataset(d / "train.jsonl")])


def test_a_phase_draws_its_selection_from_its_own_corpus(two_corpora, data):
    both = two_corpora
    recs = both.records
    main, second = both.span(data.path), both.span(both.parts[1].path)
    assert main == (0, len(data)) and second == (len(data), len(recs))
    assert both[second[0]].record == both.parts[1][0].record  # index i of the list is the i-th record of the concatenation
    cfg = _cfg(restore={"steps": 4, "general": 0.5, "perception": 0.25})
    plans = build_plan(recs, cfg, "stages.sft", spans=[second, main], main=main[1])
    own, replay = plans[0], plans[1]
    in_second = [e for e in own.entries if e >= second[0]]
    # phase 0: its 60% own share comes from the second corpus only, replay from the stage's data only
    assert sum(w for e, w in zip(own.entries, own.weights) if e >= second[0]) == pytest.approx(0.6)
    assert {recs[e].family for e in in_second} == {"reasoning"} and {recs[e].difficulty for e in in_second} <= {1, 2}
    assert all(recs[e].family != "reasoning" for e in own.entries if e < second[0])
    # phase 1 draws nothing from the second corpus; the restore's union includes phase 0's records there
    assert max(replay.entries) < second[0]
    assert set(in_second) <= set(plans[2].entries)
    with pytest.raises(IndexError):
        both[len(recs)]


def test_a_phase_corpus_without_matching_records_is_refused(two_corpora, data):
    both = two_corpora
    cfg = _cfg(phases=[{"name": "p", "select": {"families": ["perception"]}, "steps": 2}])
    with pytest.raises(VlrlError, match="stages.sft.phases.0: the phase 'p' selection part .* matches no training records"):
        build_plan(both.records, cfg, "stages.sft", spans=[both.span(both.parts[1].path)], main=len(data))

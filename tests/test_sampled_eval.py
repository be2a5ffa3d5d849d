"""Sampled eval: pass@k against its definition, the aggregation by hand, and a run on the
micro checkpoint that is reproducible by seed and scores what the engine sampled."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from rollout.engine import GenerationRequest, SamplingParams
from rollout.hf_engine import HFEngine, input_only_ids
from test_rl_stage import build_micro_start
from vlrl.answer_prior import AnswerPrior
from vlrl.answers import answer_type_for, is_correct
from vlrl.data.io import split_path
from vlrl.data.records import Record
from vlrl.eval import load_eval_samples
from vlrl.sampled_eval import RecordSamples, default_ks, pass_at_k, render_sampled_table, sampled_eval, summarize_samples

torch.set_num_threads(1)


@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (4, 0), (4, 1), (5, 2), (6, 6), (7, 3)])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="need 0 <= c <= n"):
            pass_at_k(n, c, k)


def test_default_ks_double_up_to_n():
    assert default_ks(1) == [1] and default_ks(8) == [1, 2, 4, 8] and default_ks(12) == [1, 2, 4, 8, 12]


def test_summary_by_hand():
    def r(i, task, family, d, c, t=0):
        return RecordSamples(id=str(i), task=task, family=family, difficulty=d, correct=c, truncated=t)

    rows = [r(0, "a", "reasoning", 1, 0), r(1, "a", "reasoning", 1, 2, t=1), r(2, "b", "reasoning", 2, 4), r(3, "c", "perception", 1, 1, t=3)]
    rep = summarize_samples(rows, n=4, ks=[1, 2, 4], model="m", data="d", temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, seed=0, seconds=1.0)
    # reasoning: pass@1 = (0 + 2/4 + 4/4) / 3; pass@2 = (0 + (1 - C(2,2)/C(4,2)) + 1) / 3; pass@4 = (0 + 1 + 1) / 3
    rs = rep.families["reasoning"]["all"].pass_at
    assert rs["1"] == pytest.approx(0.5) and rs["2"] == pytest.approx((5 / 6 + 1) / 3) and rs["4"] == pytest.approx(2 / 3)
    assert rep.families["reasoning"]["1"].records == 2 and rep.families["reasoning"]["1"].pass_at["1"] == pytest.approx(0.25)
    assert "3" not in rep.families["reasoning"]
    assert rep.tasks["c"]["all"].pass_at == {"1": 0.25, "2": 0.5, "4": 1.0}
    assert rep.pass_at["1"] == pytest.approx(7 / 16) and rep.truncated_frac == pytest.approx(4 / 16)
    with pytest.raises(ValueError, match="every k must be in 1..4"):
        summarize_samples(rows, n=4, ks=[8], model="m", data="d", temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, seed=0, seconds=1.0)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return build_micro_start(tmp_path_factory.mktemp("sampled"))


def test_sampled_eval_scores_the_engines_samples_and_repeats_by_seed(start, tmp_path):
    data, ckpt = start
    data_file = split_path(data, "eval")
    kw = dict(samples=4, temperature=1.0, max_new_tokens=16, batch_size=5, limit=8, seed=3)
    rep = sampled_eval(ckpt, data_file, **kw)
    assert len(rep.records) == 8 and rep.ks == [1, 2, 4]
    again = sampled_eval(ckpt, data_file, **kw)
    assert [r.model_dump() for r in again.records] == [r.model_dump() for r in rep.records]

    # The same engine and seeds by hand: batch b of 5 prompts at seed 3 + b, scored with is_correct.
    from vlrl.model.loading import load_model, load_processor

    processor = load_processor(ckpt)
    engine = HFEngine(load_model(ckpt, trainable=False), processor, suppress_token_ids=input_only_ids(processor))
    items, _ = load_eval_samples(data_file, limit=8, on_bad_image="error")
    hand = []
    for b, i in enumerate(range(0, 8, 5)):
        chunk = items[i : i + 5]
        params = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=3 + b, logprobs=False)
        outs = engine.generate([GenerationRequest.from_sample(s, request_id=f"{i + j}") for j, s in enumerate(chunk)], params)
        for s, cs in zip(chunk, outs):
            kind = answer_type_for(s.record.task, s.record.meta)
            hand.append((sum(is_correct(c.text, s.record.answer, kind) for c in cs), sum(c.finish_reason == "length" for c in cs)))
    assert [(r.correct, r.truncated) for r in rep.records] == hand
    assert rep.pass_at["1"] == pytest.approx(sum(c for c, _ in hand) / 32)
    assert rep.pass_at["1"] <= rep.pass_at["2"] <= rep.pass_at["4"]
    assert [r.id for r in rep.records] == [s.record.id for s in items]

    out = rep.to_json(tmp_path / "s.json")
    assert json.loads(out.read_text())["pass_at"] == rep.pass_at
    table = render_sampled_table(rep)
    assert [c.header for c in table.columns] == ["family / task", "@1", "@2", "@4", "n"]


def test_sampled_eval_needs_a_temperature(start):
    data, ckpt = start
    with pytest.raises(ValueError, match="temperature > 0"):
        sampled_eval(ckpt, split_path(data, "eval"), temperature=0.0)


def _rec(i, task, family, d, answer):
    return Record(id=f"r{i}", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                  answer=answer, task=task, family=family, difficulty=d)


def test_the_answer_prior_guesses_from_the_train_answers_of_the_same_task_and_difficulty():
    train = [_rec(0, "a", "reasoning", 1, "3"), _rec(1, "a", "reasoning", 1, "3"), _rec(2, "a", "reasoning", 1, "5"),
             _rec(3, "a", "reasoning", 1, " 7 "), _rec(4, "a", "reasoning", 2, "5"), _rec(5, "b", "perception", 1, "red")]
    prior = AnswerPrior(train)
    held = [_rec(10, "a", "reasoning", 1, "3"), _rec(11, "a", "reasoning", 1, "7"), _rec(12, "a", "reasoning", 2, "3"),
            _rec(13, "b", "perception", 1, "red"), _rec(14, "c", "text", 1, "x")]
    assert [prior.probability(r) for r in held] == [0.5, 0.25, 0.0, 1.0, 0.0]  # unseen task: 0
    assert [prior.mode_correct(r) for r in held] == [True, False, False, True, False]
    assert prior.pass_at(held[1], 4) == pytest.approx(1 - 0.75**4)
    t = prior.table(held, [1, 4])
    assert t["reasoning"]["1"] == {"mode": 0.5, "1": pytest.approx(0.375), "4": pytest.approx((1 - 0.5**4 + 1 - 0.75**4) / 2)}
    assert t["reasoning"]["all"]["mode"] == pytest.approx(1 / 3) and t["a"]["2"] == {"mode": 0.0, "1": 0.0, "4": 0.0}
    assert t["perception"]["all"]["4"] == 1.0 and t["text"]["all"]["mode"] == 0.0


def test_sampled_eval_puts_the_answer_prior_beside_the_model(start):
    data, ckpt = start
    rep = sampled_eval(ckpt, split_path(data, "eval"), samples=2, max_new_tokens=8, limit=6, prior_from=split_path(data, "train"))
    from vlrl.data.io import load_records

    want = AnswerPrior(load_records(split_path(data, "train"))).table(load_records(split_path(data, "eval"))[:6], [1, 2])
    assert rep.prior == want and rep.prior_from == str(split_path(data, "train"))
    table = render_sampled_table(rep)
    assert [c.header for c in table.columns][-3:] == ["prior@1", "prior@2", "n"]
    assert "never looking at the prompt" in table.caption

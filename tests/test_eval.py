"""Eval bookkeeping: greedy responses are scored with vlrl.answers and aggregated
by family / task / difficulty exactly as a hand count says; data files load."""

import json

import numpy as np
import pytest
import torch

from PIL import Image

from vlrl.answers import answer_type_for, is_correct
from vlrl.data.images import Sample
from vlrl.data.io import write_records
from vlrl.data.records import Record
from vlrl.errors import DataError
from vlrl.eval import Prediction, evaluate, generate_responses, render_steps_table, render_table, summarize
from vlrl.step_errors import diagnose

from vlrl_test_helpers import train_micro

TASKS = [("read_digits", "perception"), ("count_shapes", "perception"), ("text_arith", "text"), ("arith", "reasoning")]


def _records(n: int, rng: np.random.Generator) -> list[tuple[Record, list[Image.Image]]]:
    out = []
    for i in range(n):
        task, family = TASKS[i % len(TASKS)]
        ans = str(int(rng.integers(0, 20)))
        n_img = 0 if family == "text" else 1
        content = [{"type": "image"}] * n_img + [{"type": "text", "text": f"Task {task}: what is the answer?"}]
        rec = Record(
            id=f"e{i}",
            messages=[{"role": "user", "content": content}, {"role": "assistant", "content": f"\\boxed{{{ans}}}"}],
            images=[f"img/{i}.png"] * n_img,
            answer=ans,
            task=task,
            family=family,
            difficulty=1 + i % 3,
        )
        imgs = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(n_img)]
        out.append((rec, imgs))
    return out


@pytest.fixture(scope="module")
def trained():
    """A micro model trained a few steps, so it emits boxed answers (some right)."""
    rng = np.random.default_rng(1)
    pairs = _records(16, rng)
    samples = [Sample(r, imgs, i + 1) for i, (r, imgs) in enumerate(pairs)]
    model, processor = train_micro(samples)
    return model, processor, samples


def test_report_matches_a_hand_count(trained):
    model, processor, samples = trained
    report = evaluate((model, processor), samples, batch_size=5, max_new_tokens=12)
    assert report.n == len(samples) == len(report.predictions)
    assert [p.id for p in report.predictions] == [s.record.id for s in samples]
    hand = [is_correct(p.response, s.record.answer, answer_type_for(s.record.task, s.record.meta)) for p, s in zip(report.predictions, samples)]
    assert [p.correct for p in report.predictions] == hand
    assert report.accuracy == pytest.approx(sum(hand) / len(hand))
    for family in {s.record.family for s in samples}:
        mine = [h for h, s in zip(hand, samples) if s.record.family == family]
        assert report.by_family[family] == pytest.approx(sum(mine) / len(mine))
        for d in {s.record.difficulty for s in samples if s.record.family == family}:
            cell = [h for h, s in zip(hand, samples) if s.record.family == family and s.record.difficulty == d]
            score = report.families[family][str(d)]
            assert (score.n, score.correct) == (len(cell), sum(cell))
    for task, _ in TASKS:
        mine = [h for h, s in zip(hand, samples) if s.record.task == task]
        assert report.tasks[task]["all"].n == len(mine) and report.by_task[task] == pytest.approx(sum(mine) / len(mine))
    assert report.generated_tokens == sum(p.n_tokens for p in report.predictions) > 0
    assert report.tokens_per_second > 0


def test_batched_responses_equal_one_at_a_time(trained):
    model, processor, samples = trained
    batched = generate_responses(model, processor, samples[:6], max_new_tokens=12)
    alone = [generate_responses(model, processor, [s], max_new_tokens=12)[0] for s in samples[:6]]
    assert batched == alone
    # Responses stop at the end token and carry no special tokens.
    for text, finished, n in batched:
        assert "<|im_end|>" not in text and n <= 12
        if finished:
            assert n >= 1


def test_summarize_by_hand():
    def p(i, task, family, d, ok, fin=True):
        return Prediction(id=str(i), task=task, family=family, difficulty=d, answer="1", response="r", correct=ok, finished=fin, n_tokens=3)

    preds = [p(0, "a", "perception", 1, True), p(1, "a", "perception", 1, False), p(2, "a", "perception", 3, True),
             p(3, "b", "text", 2, False, fin=False)]
    r = summarize(preds, model="m", data="d", seconds=2.0, skipped=["x"])
    assert r.accuracy == 0.5 and r.n == 4
    assert r.by_family == {"perception": pytest.approx(2 / 3), "text": 0.0}
    assert r.families["perception"]["1"].model_dump() == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert "2" not in r.families["perception"] and r.families["perception"]["3"].correct == 1
    assert r.unfinished == 1 and r.skipped == ["x"]
    assert r.tokens_per_second == 6.0


def test_eval_from_a_data_file_with_json_and_table(trained, tmp_path):
    model, processor, samples = trained
    (tmp_path / "img").mkdir()
    recs = []
    for s in samples[:6]:
        for ref, img in zip(s.record.images, s.images):
            img.save(tmp_path / ref)
        recs.append(s.record)
    write_records(tmp_path / "eval.jsonl", recs)
    report = evaluate((model, processor), tmp_path / "eval.jsonl", batch_size=4, max_new_tokens=12, limit=5)
    assert report.n == 5 and report.data == str(tmp_path / "eval.jsonl")
    direct = evaluate((model, processor), samples[:5], batch_size=4, max_new_tokens=12)
    assert [p.response for p in report.predictions] == [p.response for p in direct.predictions]

    out = report.to_json(tmp_path / "out" / "eval.json")
    loaded = json.loads(out.read_text())
    assert loaded["accuracy"] == report.accuracy and len(loaded["predictions"]) == 5

    table = render_table(report)
    assert [c.header for c in table.columns] == ["family / task", "d1 %", "d2 %", "d3 %", "d4 %", "d5 %", "all %", "n"]
    assert table.row_count == len(report.families) + len(report.tasks)


def test_bad_image_error_or_skip(trained, tmp_path):
    model, processor, samples = trained
    (tmp_path / "img").mkdir()
    recs = [s.record for s in samples[:4]]
    for s in samples[1:4]:  # the first record's image is missing
        for ref, img in zip(s.record.images, s.images):
            img.save(tmp_path / ref)
    write_records(tmp_path / "eval.jsonl", recs)
    with pytest.raises(DataError, match="missing"):
        evaluate((model, processor), tmp_path / "eval.jsonl", max_new_tokens=4)
    report = evaluate((model, processor), tmp_path / "eval.jsonl", max_new_tokens=4, on_bad_image="skip")
    assert report.skipped == [recs[0].id] and report.n == 3


def test_eval_loads_a_checkpoint_folder(trained, tmp_path):
    model, processor, samples = trained
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    from_dir = evaluate(tmp_path, samples[:4], max_new_tokens=8)
    in_memory = evaluate((model, processor), samples[:4], max_new_tokens=8)
    assert [p.response for p in from_dir.predictions] == [p.response for p in in_memory.predictions]
    assert from_dir.model == str(tmp_path)


def test_records_whose_reference_does_not_fit_the_budget_are_counted_and_named(trained):
    """A reference of k tokens needs k + 1 (its end token): at a budget of exactly that the
    record fits, one less and it is counted under its task and difficulty."""
    from vlrl.eval import describe_over_budget, over_budget_cells, reference_lengths

    model, processor, samples = trained
    records = [s.record for s in samples]
    lengths = reference_lengths(records, processor.tokenizer)
    for r, n in zip(records, lengths):
        assert n == len(processor.tokenizer(r.target_text(), add_special_tokens=False)["input_ids"]) + 1
    longest = max(lengths)
    assert over_budget_cells(records, processor.tokenizer, longest) == ({}, longest)
    cells, _ = over_budget_cells(records, processor.tokenizer, longest - 1)
    want: dict[str, int] = {}
    for r, n in zip(records, lengths):
        if n == longest:
            want[f"{r.task}/d{r.difficulty}"] = want.get(f"{r.task}/d{r.difficulty}", 0) + 1
    assert cells == want and sum(cells.values()) >= 1

    report = evaluate((model, processor), samples, batch_size=8, max_new_tokens=longest - 1)
    assert (report.over_budget, report.over_budget_cells, report.longest_reference) == (sum(want.values()), want, longest)
    assert evaluate((model, processor), samples[:4], batch_size=4, max_new_tokens=longest).over_budget == 0
    line = describe_over_budget(cells, len(records), longest - 1, "eval.max_new_tokens", longest)
    assert f"of {len(records)} records" in line and f"eval.max_new_tokens={longest - 1}" in line and f"needs {longest}" in line
    for task in {k.split("/")[0] for k in want}:
        ds = sorted(int(k.split("/d")[1]) for k in want if k.startswith(task + "/"))
        assert f"{task} d{','.join(map(str, ds))} {sum(v for k, v in want.items() if k.startswith(task + '/'))}" in line
    assert "with a reference longer than max_new_tokens" in render_table(report).caption


def test_the_answer_prior_sits_beside_the_greedy_scores(trained, tmp_path):
    """With a train split given, each family / task / difficulty carries the accuracy of
    answering its commonest train answer; the table gets a prior column."""
    from vlrl.answer_prior import AnswerPrior

    model, processor, samples = trained
    train = [s.record for s in samples[8:]]
    write_records(tmp_path / "train.jsonl", train)
    report = evaluate((model, processor), samples[:8], batch_size=8, max_new_tokens=6, prior_from=tmp_path / "train.jsonl")
    want = AnswerPrior(train).table([s.record for s in samples[:8]], [])
    assert report.prior == {name: {d: c["mode"] for d, c in cells.items()} for name, cells in want.items()}
    assert set(report.prior) == set(report.families) | set(report.tasks)
    for name, cells in report.families.items():
        assert set(report.prior[name]) == set(cells)
    table = render_table(report)
    assert [c.header for c in table.columns][-2:] == ["prior %", "n"] and "commonest train answer" in table.caption
    assert evaluate((model, processor), samples[:4], batch_size=4, max_new_tokens=6).prior is None


def test_records_with_worked_references_get_the_step_diagnosis(trained):
    """The eval reads each response's computations against its record's reference; the
    report's counts are diagnose() of the same rows, and the table has one row per task."""
    model, processor, samples = trained
    worked = []
    for s in samples[:8]:
        rec = s.record
        ref = f"{rec.answer} - 0 = {rec.answer}. \\boxed{{{rec.answer}}}" if rec.task == "arith" else rec.target_text()
        data = rec.model_dump()
        data["messages"] = [data["messages"][0], {"role": "assistant", "content": ref}]
        worked.append(Sample(Record.model_validate(data), s.images, s.row))
    report = evaluate((model, processor), worked, batch_size=4, max_new_tokens=12)
    arith = [s for s in worked if s.record.task == "arith"]
    assert arith and list(report.steps) == ["arith"] and report.steps["arith"].n == len(arith)
    by_id = {p.id: p for p in report.predictions}
    rows = [(s.record.task, by_id[s.record.id].response, s.record.target_text(), by_id[s.record.id].correct) for s in worked]
    assert report.steps == diagnose(rows)
    assert report.steps["arith"].wrong == sum(not by_id[s.record.id].correct for s in arith)
    assert render_steps_table(report).row_count == 1
    assert render_steps_table(evaluate((model, processor), samples[:4], batch_size=4, max_new_tokens=4)) is None

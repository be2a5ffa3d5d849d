"""Greedy evaluation on a held-out set: accuracy by family, task and difficulty.

Every stage of a recipe ends with this, so its numbers must mean the same for
the tiny model and a real checkpoint: greedy decoding (`do_sample=False`, KV
cache), the record's own prompt through the checkpoint's chat template, and
correctness by `vlrl.answers.is_correct` — the same check the rule rewards use.
A response that never emits an end token within `max_new_tokens` is scored as
it stands and counted in `unfinished`. Records whose own reference response needs more
than `max_new_tokens` (its tokens and the end token) are counted in `over_budget` and
named per task and difficulty: a model that answers as it was taught cannot get them
right, so a family's accuracy there measures the budget, not the model (the tiny
recipe's arithmetic at difficulty 4-5 needed 62 tokens against an eval budget of 40).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from rich.table import Table

from vlrl.answers import answer_type_for, is_correct
from vlrl.model.stops import stop_token_ids
from vlrl.model.batching import Sample, collate_for_generation, pad_id
from vlrl.report_cells import DIFFICULTIES, JsonReport, difficulty_cells
from vlrl.step_errors import StepStats, diagnose



class Prediction(BaseModel):
    id: str
    task: str
    family: str
    difficulty: int
    answer: str | None
    response: str
    correct: bool
    finished: bool  # an end token was generated within max_new_tokens
    n_tokens: int  # generated tokens, end token included


class Score(BaseModel):
    n: int
    correct: int
    accuracy: float


class EvalReport(JsonReport):
    model: str
    data: str
    n: int
    accuracy: float
    by_family: dict[str, float]
    by_task: dict[str, float]
    # name -> difficulty ("1".."5", "all") -> Score; keys are strings so the JSON round-trips
    families: dict[str, dict[str, Score]]
    tasks: dict[str, dict[str, Score]]
    unfinished: int
    # records whose reference response does not fit max_new_tokens; "task/d<k>" -> count
    over_budget: int = 0
    over_budget_cells: dict[str, int] = {}
    max_new_tokens: int | None = None
    longest_reference: int | None = None  # tokens, end token included
    # the answer-prior baseline (vlrl.answer_prior): the commonest train answer of each
    # record's task and difficulty; family or task -> difficulty ("1".."5", "all") -> accuracy
    prior: dict[str, dict[str, float]] | None = None
    prior_from: str | None = None
    # per task with worked references: values read vs arithmetic (vlrl.step_errors)
    steps: dict[str, StepStats] = {}
    skipped: list[str]  # record ids left out because an image could not be read
    generated_tokens: int
    seconds: float
    tokens_per_second: float
    predictions: list[Prediction]


def _score(preds: list[Prediction]) -> Score:
    correct = sum(p.correct for p in preds)
    return Score(n=len(preds), correct=correct, accuracy=correct / len(preds) if preds else 0.0)


def _grid(preds: Iterable[Prediction], key: str) -> dict[str, dict[str, Score]]:
    return {name: {d: _score(c) for d, c in cells.items()} for name, cells in difficulty_cells(preds, key).items()}


def summarize(
    predictions: list[Prediction], *, model: str, data: str, seconds: float, skipped: Sequence[str] = (),
    over_budget: dict[str, int] | None = None, max_new_tokens: int | None = None, longest_reference: int | None = None,
) -> EvalReport:
    """Aggregate per-sample predictions into the report."""
    families = _grid(predictions, "family")
    tasks = _grid(predictions, "task")
    tokens = sum(p.n_tokens for p in predictions)
    return EvalReport(
        model=model,
        data=data,
        n=len(predictions),
        accuracy=_score(predictions).accuracy,
        by_family={k: v["all"].accuracy for k, v in families.items()},
        by_task={k: v["all"].accuracy for k, v in tasks.items()},
        families=families,
        tasks=tasks,
        unfinished=sum(not p.finished for p in predictions),
        over_budget=sum((over_budget or {}).values()),
        over_budget_cells=dict(over_budget or {}),
        max_new_tokens=max_new_tokens,
        longest_reference=longest_reference,
        skipped=list(skipped),
        generated_tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        predictions=predictions,
    )


def reference_lengths(records: Iterable, tokenizer) -> list[int | None]:
    """Tokens of each record's reference response plus its end token (None: no reference).
    One batched tokenizer call: the RL stage runs this over its whole prompt pool."""
    targets = [r.target_text() for r in records]
    known = [t for t in targets if t is not None]
    ids = iter(tokenizer(known, add_special_tokens=False)["input_ids"] if known else [])
    return [None if t is None else len(next(ids)) + 1 for t in targets]


def over_budget_cells(records: Sequence, tokenizer, budget: int) -> tuple[dict[str, int], int | None]:
    """("task/d<k>" -> how many records' reference responses need more than `budget`
    tokens, the longest reference in tokens)."""
    cells: dict[str, int] = defaultdict(int)
    lengths = reference_lengths(records, tokenizer)
    for r, n in zip(records, lengths):
        if n is not None and n > budget:
            cells[f"{r.task}/d{r.difficulty}"] += 1
    known = [n for n in lengths if n is not None]
    return dict(sorted(cells.items())), max(known) if known else None


def describe_over_budget(cells: dict[str, int], total: int, budget: int, setting: str, longest: int | None = None, what: str = "records") -> str:
    """One line a user can act on: how many, where, and what to raise."""
    n = sum(cells.values())
    by_task: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for key, count in cells.items():
        task, d = key.rsplit("/d", 1)
        by_task[task].append((int(d), count))
    where = ", ".join(
        f"{task} d{','.join(str(d) for d, _ in sorted(ds))} {sum(c for _, c in ds)}" for task, ds in sorted(by_task.items())
    )
    need = f" (the longest needs {longest})" if longest else ""
    return f"{n} of {total} {what} have a reference response longer than {setting}={budget} tokens{need}: {where}; they cannot be answered as taught, raise {setting}"


def _greedy_config(model, processor, max_new_tokens: int):
    cfg = copy.deepcopy(model.generation_config)
    # Sampling fields from a checkpoint's generation_config would only warn under greedy decoding.
    cfg.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1)
    cfg.max_new_tokens = max_new_tokens
    cfg.eos_token_id = list(stop_token_ids(model, processor))
    cfg.pad_token_id = pad_id(processor)
    cfg.use_cache = True
    return cfg


@torch.inference_mode()
def generate_responses(model, processor, samples: Sequence[Sample], *, max_new_tokens: int) -> list[tuple[str, bool, int]]:
    """Greedy responses for one batch: (text, finished, generated tokens) per sample."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_for_generation(samples, processor).items()}
    cfg = _greedy_config(model, processor, max_new_tokens)
    out = model.generate(**batch, generation_config=cfg)  # (B, T_prompt + T_new)
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    stops = set(cfg.eos_token_id)
    results = []
    for row in new:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        kept = row if end is None else row[:end]
        text = processor.tokenizer.decode(kept, skip_special_tokens=True)
        results.append((text, end is not None, len(row) if end is None else end + 1))
    return results


def evaluate(
    model: str | Path | tuple,
    data: str | Path | Sequence[Sample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    limit: int | None = None,
    device: str = "cpu",
    on_bad_image: Literal["error", "skip"] = "error",
    prior_from: str | Path | None = None,
) -> EvalReport:
    """Greedy-decode `data` (a .jsonl/.parquet file, or loaded samples) with
    `model` (a checkpoint folder, or a `(model, processor)` pair that stays on
    its device) and score every response. `prior_from`: a train split whose
    commonest answers give the answer-prior baseline beside each row."""
    if isinstance(model, tuple):
        net, processor = model
        model_name = getattr(net, "name_or_path", "") or type(net).__name__
    else:
        from vlrl.model.loading import load_model, load_processor

        net, processor = load_model(model, device=device, trainable=False), load_processor(model)
        model_name = str(model)
    if isinstance(data, (str, Path)):
        samples, skipped = load_eval_samples(Path(data), limit=limit, on_bad_image=on_bad_image)
        data_name = str(data)
    else:
        samples, skipped = list(data)[:limit] if limit is not None else list(data), []
        data_name = f"<{len(samples)} samples>"
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    over, longest = over_budget_cells([s.record for s in samples], processor.tokenizer, max_new_tokens)

    was_training = net.training
    net.eval()
    predictions: list[Prediction] = []
    start = time.perf_counter()
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            for s, (text, finished, n_tok) in zip(chunk, generate_responses(net, processor, chunk, max_new_tokens=max_new_tokens)):
                predictions.append(_predict(s, text, finished, n_tok))
    finally:
        net.train(was_training)
    report = summarize(
        predictions, model=model_name, data=data_name, seconds=time.perf_counter() - start, skipped=skipped,
        over_budget=over, max_new_tokens=max_new_tokens, longest_reference=longest,
    )
    report.steps = diagnose((p.task, p.response, s.record.target_text(), p.correct) for s, p in zip(samples, predictions))
    if prior_from is not None:
        from vlrl.answer_prior import AnswerPrior
        from vlrl.data.io import load_records

        table = AnswerPrior(load_records(Path(prior_from))).table([s.record for s in samples], [])
        report.prior = {name: {d: cell["mode"] for d, cell in cells.items()} for name, cells in table.items()}
        report.prior_from = str(prior_from)
    return report


def _predict(s: Sample, text: str, finished: bool, n_tokens: int) -> Prediction:
    r = s.record
    correct = r.answer is not None and is_correct(text, r.answer, answer_type_for(r.task, r.meta))
    return Prediction(
        id=r.id, task=r.task, family=r.family, difficulty=r.difficulty, answer=r.answer,
        response=text, correct=correct, finished=finished, n_tokens=n_tokens,
    )


def load_eval_samples(path: Path, *, limit: int | None, on_bad_image: Literal["error", "skip"]) -> tuple[list[Sample], list[str]]:
    """Records of a data file with their images (paths relative to its folder);
    with on_bad_image="skip", ids of records whose images failed come back apart."""
    from vlrl.data.images import RecordDataset

    dataset = RecordDataset(path, on_bad_image=on_bad_image)
    records = dataset.records
    n = len(records) if limit is None else min(limit, len(records))
    samples, skipped = [], []
    for i in range(n):
        sample = dataset[i]
        if sample is None:
            skipped.append(records[i].id)
        else:
            samples.append(sample)
    return samples, skipped


def _pct(score: Score | None) -> str:
    return "" if score is None else f"{100 * score.accuracy:.1f}"


def render_table(report: EvalReport) -> Table:
    """Accuracy % by difficulty for each family, then each task; counts per
    cell are in the JSON report, the table keeps each row's total."""
    table = Table(title=f"eval {report.model} on {report.data}: {100 * report.accuracy:.1f}% of {report.n}")
    table.add_column("family / task", no_wrap=True)
    for d in DIFFICULTIES:
        table.add_column(f"d{d} %", justify="right")
    table.add_column("all %", justify="right")
    if report.prior is not None:
        table.add_column("prior %", justify="right", style="dim")
    table.add_column("n", justify="right")
    sections = [("", report.families), ("  ", report.tasks)]
    for k, (indent, grid) in enumerate(sections):
        if k:
            table.add_section()
        for name, cells in grid.items():
            prior = [] if report.prior is None else [f"{100 * report.prior[name]['all']:.1f}"]
            table.add_row(indent + name, *(_pct(cells.get(d)) for d in DIFFICULTIES), _pct(cells["all"]), *prior, str(cells["all"].n))
    notes = [f"{report.tokens_per_second:.0f} generated tok/s"]
    if report.unfinished:
        notes.append(f"{report.unfinished} unfinished (no end token in max_new_tokens)")
    if report.skipped:
        notes.append(f"{len(report.skipped)} skipped (bad image)")
    if report.over_budget:
        notes.append(f"{report.over_budget} with a reference longer than max_new_tokens={report.max_new_tokens} (see the warning)")
    if report.prior is not None:
        notes.append("prior: the commonest train answer of each record's task and difficulty, never looking at the prompt")
    table.caption = ", ".join(notes)
    return table


def render_steps_table(report: EvalReport) -> Table | None:
    """Values read vs arithmetic for the tasks whose references show their computations."""
    if not report.steps:
        return None
    table = Table(title="worked steps, % of responses")
    for col in ("task", "n", "read %", "computed %", "slip %", "misread %", "no steps %"):
        table.add_column(col, justify="left" if col == "task" else "right", no_wrap=True)
    for task, st in report.steps.items():
        pct = [100 * x / st.n for x in (st.values_read, st.computed, st.wrong_slip, st.wrong_steps_hold, st.wrong_no_steps)]
        table.add_row(task, str(st.n), *(f"{x:.1f}" for x in pct))
    table.caption = (
        "read: the first computation uses the reference's values; computed: every computation holds; "
        "wrong answers with a false equation (slip), with every equation true (a misread value or a wrong operation), with none"
    )
    return table

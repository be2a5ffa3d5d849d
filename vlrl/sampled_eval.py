"""Sampled evaluation: k samples per held-out record, pass@1 and pass@k.

Greedy accuracy says what a checkpoint answers; pass@k says what it *can* answer when
it samples. GRPO mostly moves probability between answers the policy already samples
(it turns pass@k into pass@1), so pass@k at the rollout temperature bounds what RL from
that checkpoint can reach on those records, and a pass@1 well below the greedy accuracy
says sampling at that temperature mostly explores wrong answers. Both are measured here
with the RL stage's own engine and settings (same sampler, same suppressed tokens).

pass@k uses the unbiased estimator of Chen et al. (2021, "Evaluating Large Language
Models Trained on Code"): with n samples of which c are correct,
pass@k = 1 - C(n - c, k) / C(n, k), averaged over records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from rich.table import Table

from vlrl.answers import answer_type_for, is_correct
from vlrl.report_cells import DIFFICULTIES, JsonReport, difficulty_cells

def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n
    (c of them correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


class RecordSamples(BaseModel):
    id: str
    task: str
    family: str
    difficulty: int
    correct: int  # of `samples`
    truncated: int  # samples that hit max_new_tokens


class PassScore(BaseModel):
    records: int
    pass_at: dict[str, float]  # "k" -> mean pass@k over the records


class SampledReport(JsonReport):
    model: str
    data: str
    samples: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    ks: list[int]
    pass_at: dict[str, float]  # over all records
    families: dict[str, dict[str, PassScore]]  # family -> difficulty ("1".."5", "all")
    tasks: dict[str, dict[str, PassScore]]
    truncated_frac: float
    # the answer-prior guesser on the same records (vlrl.answer_prior), when a train split was given:
    # family or task -> difficulty ("1".."5", "all") -> {"mode": accuracy, "k": pass@k}
    prior: dict[str, dict[str, dict[str, float]]] | None = None
    prior_from: str | None = None
    skipped: list[str]
    seconds: float
    records: list[RecordSamples]


def _score(rows: Sequence[RecordSamples], n: int, ks: Sequence[int]) -> PassScore:
    return PassScore(
        records=len(rows),
        pass_at={str(k): sum(pass_at_k(n, r.correct, k) for r in rows) / len(rows) if rows else 0.0 for k in ks},
    )


def _grid(rows: Sequence[RecordSamples], key: str, n: int, ks: Sequence[int]) -> dict[str, dict[str, PassScore]]:
    return {name: {d: _score(c, n, ks) for d, c in cells.items()} for name, cells in difficulty_cells(rows, key).items()}


def summarize_samples(
    rows: list[RecordSamples], *, n: int, ks: Sequence[int], model: str, data: str, temperature: float, top_p: float, top_k: int,
    max_new_tokens: int, seed: int, seconds: float, skipped: Sequence[str] = (),
) -> SampledReport:
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"every k must be in 1..{n} (the samples per record), got {bad}")
    return SampledReport(
        model=model, data=data, samples=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed,
        ks=list(ks), pass_at=_score(rows, n, ks).pass_at, families=_grid(rows, "family", n, ks), tasks=_grid(rows, "task", n, ks),
        truncated_frac=sum(r.truncated for r in rows) / (n * len(rows)) if rows else 0.0, skipped=list(skipped), seconds=seconds,
        records=rows,
    )


def sampled_eval(
    model: str | Path,
    data: str | Path,
    *,
    samples: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    ks: Sequence[int] | None = None,
    device: str = "cpu",
    on_bad_image: Literal["error", "skip"] = "error",
    prior_from: str | Path | None = None,
) -> SampledReport:
    """`samples` completions of every record of `data` (a .jsonl/.parquet file) from the
    checkpoint at `model`, scored with `vlrl.answers.is_correct`. Batch b of
    `batch_size` prompts is sampled with seed `seed + b`, so a rerun gives the same report.
    `prior_from`: a train split whose answers give the answer-prior baseline beside it."""
    from rollout.engine import GenerationRequest, SamplingParams
    from rollout.hf_engine import HFEngine, input_only_ids
    from vlrl.eval import load_eval_samples
    from vlrl.model.loading import load_model, load_processor

    if temperature <= 0:
        raise ValueError("sampled eval needs temperature > 0 (temperature 0 is the greedy eval: `vlrl eval` without --samples)")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    ks = list(ks) if ks else default_ks(samples)
    processor = load_processor(model)
    net = load_model(model, device=device, dtype="float32", trainable=False)
    # The RL stage's sampler: vision placeholders never sampled, the model's end tokens.
    engine = HFEngine(net, processor, suppress_token_ids=input_only_ids(processor), max_batch_rows=max(256, samples))
    items, skipped = load_eval_samples(Path(data), limit=limit, on_bad_image=on_bad_image)
    rows: list[RecordSamples] = []
    start = time.perf_counter()
    for b, i in enumerate(range(0, len(items), batch_size)):
        chunk = items[i : i + batch_size]
        params = SamplingParams(
            n=samples, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed + b, logprobs=False
        )
        outs = engine.generate([GenerationRequest.from_sample(s, request_id=f"{i + j}") for j, s in enumerate(chunk)], params)
        for s, completions in zip(chunk, outs):
            r = s.record
            kind = answer_type_for(r.task, r.meta)
            correct = sum(r.answer is not None and is_correct(c.text, r.answer, kind) for c in completions)
            rows.append(RecordSamples(
                id=r.id, task=r.task, family=r.family, difficulty=r.difficulty, correct=correct,
                truncated=sum(c.finish_reason == "length" for c in completions),
            ))
    report = summarize_samples(
        rows, n=samples, ks=ks, model=str(model), data=str(data), temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, seed=seed, seconds=time.perf_counter() - start, skipped=skipped,
    )
    if prior_from is not None:
        from vlrl.answer_prior import AnswerPrior
        from vlrl.data.io import load_records

        prior = AnswerPrior(load_records(Path(prior_from)))
        report.prior = prior.table([s.record for s in items], ks)
        report.prior_from = str(prior_from)
    return report


def render_sampled_table(report: SampledReport) -> Table:
    """pass@k % per family and task (all difficulties), then pass@1 / pass@max by difficulty per family."""
    n = report.samples
    table = Table(title=f"pass@k % of {report.model}: {n} samples per record at T {report.temperature:g}, {len(report.records)} records")
    table.add_column("family / task", no_wrap=True)
    first, last = str(report.ks[0]), str(report.ks[-1])
    for k in report.ks:
        table.add_column(f"@{k}", justify="right")
    if report.prior is not None:
        table.add_column(f"prior@{first}", justify="right", style="dim")
        table.add_column(f"prior@{last}", justify="right", style="dim")
    table.add_column("n", justify="right")
    for k, (indent, grid) in enumerate([("", report.families), ("  ", report.tasks)]):
        if k:
            table.add_section()
        for name, cells in grid.items():
            prior = []
            if report.prior is not None:
                p = report.prior[name]["all"]
                prior = [f"{100 * p[first]:.1f}", f"{100 * p[last]:.1f}"]
            table.add_row(
                indent + name, *(f"{100 * cells['all'].pass_at[str(j)]:.1f}" for j in report.ks), *prior, str(cells["all"].records)
            )
    per_d = "; ".join(
        f"{fam} " + " ".join(f"d{d} {100 * c[d].pass_at[first]:.0f}/{100 * c[d].pass_at[last]:.0f}" for d in DIFFICULTIES if d in c)
        for fam, c in report.families.items()
    )
    caption = f"pass@{first}/pass@{last} % by difficulty: {per_d}; {100 * report.truncated_frac:.1f}% of samples hit max_new_tokens"
    if report.prior is not None:
        caption += (
            f". prior: answers guessed from the training answers of the same task and difficulty ({report.prior_from}), "
            "never looking at the prompt"
        )
    table.caption = caption
    return table

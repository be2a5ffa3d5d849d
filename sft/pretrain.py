"""The pretraining stage: MindVL-style phases run one after another.

Typical phases (recipes/tiny.yaml): `language` trains the language model on text;
`warmup` trains the vision tower and projector with the language model frozen
(for a pretrained base set `trainable: projector`, as MindVL does); `multitask`
trains everything on mixed image and text data.

Phases draw from the stage's `data` unless a phase names its own (`data:` on the
phase, MindVL's corpus per phase), and pick records from it with a `select`
(families, tasks, difficulty). Each phase starts a fresh AdamW (its trainable set
differs from the last).

Resume: `state/` holds weights, optimizer, phase and step; batch k of a phase is a
pure function of (seed, phase, k), so a killed stage continues exactly where its
last checkpoint was taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from sft.sampler import BatchSampler
from sft.state import TrainerState, load_state, read_state, save_hf_checkpoint, save_state
from sft.trainer import LoopHooks, load_for_training, make_optimizer, make_progress, train_steps
from vlrl.data.records import Record
from vlrl.data.synth import select_indices
from vlrl.errors import VlrlError
from vlrl.recipe import DataSelect, Phase, PretrainStage

TRAINABLE = {
    "all": ("language", "vision", "projector"),
    "language": ("language",),
    "vision": ("vision",),
    "vision+projector": ("vision", "projector"),
    "projector": ("projector",),
}


def phase_pool(records: list[Record], select: DataSelect) -> tuple[list[int], list[float] | None]:
    """Indices of the records a phase trains on, and per-record sampling weights if the
    phase gives family weights (weights are spread evenly over a family's records)."""
    idx = select_indices(records, families=select.families, tasks=select.tasks, difficulty=select.difficulty)
    if not select.weights:
        return idx, None
    per_family: dict[str, int] = {}
    for i in idx:
        per_family[records[i].family] = per_family.get(records[i].family, 0) + 1
    weights = [select.weights.get(records[i].family, 0.0) / per_family[records[i].family] for i in idx]
    return idx, weights


def _batches(dataset, processor, pool: list[int], sampler: BatchSampler, *, start: int, grad_accum: int, phase: Phase, max_length: int, counters: dict) -> Iterator[list[dict]]:
    """Micro-batches of optimizer step `start`, `start+1`, ... (batch k = micro-batch index)."""
    from vlrl.model.batching import collate_for_training

    step = start
    while True:
        micro = []
        for a in range(grad_accum):
            samples = [dataset[pool[j]] for j in sampler.batch(step * grad_accum + a)]
            kept = [s for s in samples if s is not None]
            counters["skipped"] += len(samples) - len(kept)
            if not kept:
                continue
            micro.append(collate_for_training(kept, processor, loss_on=phase.loss_on, max_length=max_length))
        if not micro:
            raise VlrlError(f"phase {phase.name!r}: every sample of step {step} was skipped for a bad image")
        yield micro
        step += 1


def run_stage(ctx) -> dict:
    cfg: PretrainStage = ctx.config
    from vlrl.data.images import RecordDataset
    from vlrl.data.io import split_path
    from vlrl.model.loading import component_of, count_parameters, load_processor, set_trainable

    final = ctx.checkpoint_dir
    state_dir = ctx.dir / "state"
    prior = read_state(state_dir)
    if prior is not None and prior.complete and (final / "config.json").is_file():
        ctx.console.print(f"[dim]pretrain already trained ({prior.global_step} steps); checkpoint at {final}[/]")
        return {"steps": prior.global_step, "tokens": prior.tokens, "skipped": prior.skipped}

    seed = ctx.seed()
    torch.manual_seed(seed)
    model, compute_dtype = load_for_training(ctx.inputs["from"], ctx.device.kind, cfg)
    processor = load_processor(ctx.inputs["from"])
    datasets: dict[Path, RecordDataset] = {}

    def phase_dataset(pi: int) -> RecordDataset:
        """The phase's own `data` if it names one, else the stage's; each file loaded once."""
        path = split_path(ctx.inputs.get(f"phases.{pi}.data", ctx.inputs["data"]), "train")
        if path not in datasets:
            datasets[path] = RecordDataset(path, on_bad_image=cfg.on_bad_image)
        return datasets[path]

    state = TrainerState()
    if prior is not None:
        state = load_state(state_dir, model)  # weights now; optimizer below, once it exists
        ctx.console.print(f"[yellow]resuming[/] pretrain at phase {state.phase} step {state.step} (global step {state.global_step})")

    tracker = ctx.tracker()
    counters = {"skipped": state.skipped}
    try:
        with make_progress(ctx.console) as progress:
            for pi, phase in enumerate(cfg.phases):
                if pi < state.phase:
                    continue
                counts = set_trainable(model, TRAINABLE[phase.trainable])
                dataset = phase_dataset(pi)
                pool, weights = phase_pool(dataset.records, phase.select)
                if not pool:
                    raise VlrlError(
                        f"stages.{ctx.name}.phases.{pi}.select: no training records in {dataset.path} match {phase.select.model_dump(exclude_none=True)}"
                    )
                bs = phase.batch_size or cfg.batch_size
                spec = phase.optim or cfg.optim
                optimizer = make_optimizer(model.named_parameters(), spec, component_of)
                start = state.step if state.phase == pi else 0
                if start > 0:
                    load_state(state_dir, model, optimizer, restore_rng=True)
                sampler = BatchSampler(len(pool), bs, seed=seed, phase=pi, weights=weights)
                batches = _batches(dataset, processor, pool, sampler, start=start, grad_accum=cfg.grad_accum, phase=phase, max_length=cfg.max_length, counters=counters)
                base_step = state.global_step - start

                def log(done: int, m: dict, _pi=pi, _phase=phase, _base=base_step) -> None:
                    tracker.log({f"train/{k}": v for k, v in m.items()} | {"train/phase": _pi, "data/skipped": counters["skipped"]}, step=_base + done)

                def checkpoint(done: int, _pi=pi, _base=base_step, _opt=optimizer) -> None:
                    st = TrainerState(phase=_pi, step=done, global_step=_base + done, skipped=counters["skipped"])
                    save_state(state_dir, model, _opt, st)

                ctx.console.print(f"phase [bold]{phase.name}[/]: {len(pool)} records, trainable {phase.trainable} ({counts['trainable']:,} params), {phase.steps} steps")
                train_steps(model, optimizer, batches, start=start, total=phase.steps, spec=spec, device=ctx.device.torch_device,
                            hooks=LoopHooks(log, checkpoint, cfg.log_every, cfg.checkpoint_every), compute_dtype=compute_dtype, progress=progress, description=phase.name)
                state = TrainerState(phase=pi + 1, step=0, global_step=base_step + phase.steps, skipped=counters["skipped"])
                save_state(state_dir, model, None, state)  # phase boundary: the next phase starts a fresh optimizer
    finally:
        tracker.close()

    set_trainable(model, TRAINABLE["all"])
    save_hf_checkpoint(final, model, processor)
    state.complete = True
    save_state(state_dir, model, None, state)
    ctx.console.print(f"pretrained checkpoint: {final} ({count_parameters(model)['total']:,} params, {counters['skipped']} samples skipped)")
    return {"steps": state.global_step, "skipped": counters["skipped"]}

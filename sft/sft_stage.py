"""The SFT stage: instruction tuning along a collaborative curriculum (sft/curriculum.py).

Loss on assistant tokens only; image and text-only records share batches (and,
with packing, rows). Each phase starts a fresh AdamW whose learning-rate schedule
spans that phase, as in pretraining, so a phase's `optim` is self-contained.

A component whose `optim.lr_mult` is 0 in a phase is frozen for that phase (no
gradients): it would not move anyway, and its gradients would cost a backward pass
through it and count in the clipping norm of the parts that do train (the tiny recipe's
frozen tower: packed SFT 5,462 -> 7,318 tokens/s on 2 cores).

Resume: `state/` holds weights, optimizer, phase, step and the consumed-data
tracker (cursor + pending); a killed stage continues with the exact batches it
would have seen (sft/feed.py), so the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import json

import torch

from sft.curriculum import RecordStream, build_plan, family_shares
from sft.feed import Feed
from sft.state import TrainerState, load_state, read_state, save_hf_checkpoint, save_state
from sft.trainer import LoopHooks, load_for_training, make_optimizer, make_progress, train_steps, trained_components
from vlrl.recipe_sft import SftStage


def run_stage(ctx) -> dict:
    cfg: SftStage = ctx.config
    from vlrl.data.images import RecordDataset, RecordDatasets
    from vlrl.data.io import split_path
    from vlrl.model.loading import component_of, load_processor, set_trainable
    from vlrl.model.packing import PackedForward
    from vlrl.resolution import with_pixel_bounds

    final = ctx.checkpoint_dir
    state_dir = ctx.dir / "state"
    prior = read_state(state_dir)
    if prior is not None and prior.complete and (final / "config.json").is_file():
        ctx.console.print(f"[dim]sft already trained ({prior.global_step} steps); checkpoint at {final}[/]")
        return {"steps": prior.global_step, "consumed": prior.consumed, "skipped": prior.skipped}

    seed = ctx.seed()
    torch.manual_seed(seed)
    model, compute_dtype = load_for_training(ctx.inputs["from"], ctx.device.kind, cfg)
    processor = load_processor(ctx.inputs["from"])
    if cfg.min_pixels is not None or cfg.max_pixels is not None:
        processor = with_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
        ctx.console.print(f"images resized within {processor.image_processor.size['shortest_edge']:,}"
                          f"-{processor.image_processor.size['longest_edge']:,} pixels")
    paths = [split_path(ctx.inputs["data"], "train")]
    for pi in range(len(cfg.phases)):
        own = split_path(ctx.inputs.get(f"phases.{pi}.data", ctx.inputs["data"]), "train")
        if own not in paths:
            paths.append(own)
    dataset = RecordDatasets([RecordDataset(p, on_bad_image=cfg.on_bad_image) for p in paths])
    records = dataset.records
    sources = [split_path(ctx.inputs.get(f"phases.{pi}.data", ctx.inputs["data"]), "train") for pi in range(len(cfg.phases))]
    plans = build_plan(records, cfg, f"stages.{ctx.name}", spans=[dataset.span(p) for p in sources], main=dataset.span(paths[0])[1])
    sources += [None] * (len(plans) - len(sources))  # the restore draws from every phase's corpus
    (ctx.dir / "plan.json").write_text(json.dumps(
        [{"name": p.name, "steps": p.steps, "lr": p.optim.lr, "shares": p.shares, "families": family_shares(records, p),
          "source": str(src) if src else "phases", "replay_source": str(paths[0])} for p, src in zip(plans, sources)], indent=2))

    state = TrainerState()
    if prior is not None:
        state = load_state(state_dir, model)  # weights now; optimizer below, once it exists
        ctx.console.print(f"[yellow]resuming[/] sft at phase {state.phase} step {state.step} (global step {state.global_step}, {state.consumed} records consumed)")

    forward = PackedForward(model)
    tracker = ctx.tracker()
    efficiency = []
    try:
        with make_progress(ctx.console) as progress:
            for pi, plan in enumerate(plans):
                if pi < state.phase:
                    continue
                set_trainable(model, trained_components(plan.optim, f"stages.{ctx.name}.phases.{plan.name}"))
                optimizer = make_optimizer(model.named_parameters(), plan.optim, component_of)
                start = state.step if state.phase == pi else 0
                if start > 0:
                    load_state(state_dir, model, optimizer, restore_rng=True)
                feed = Feed(dataset, processor, RecordStream(plan, seed=seed, phase=pi), batch_size=cfg.batch_size,
                            max_length=cfg.max_length, packing=cfg.packing, rope_index=model.model.get_rope_index,
                            cursor=state.cursor if start > 0 else 0, pending=list(state.pending) if start > 0 else [])
                feed.stats.skipped, feed.stats.consumed = state.skipped, state.consumed
                base = state.global_step - start

                def log(done: int, m: dict, _pi=pi, _feed=feed, _base=base) -> None:
                    eff = _feed.stats.window()
                    efficiency.append(eff)
                    tracker.log({f"train/{k}": v for k, v in m.items()} | {
                        "train/phase": _pi, "train/pack_efficiency": eff, "data/cursor": _feed.cursor,
                        "data/consumed": _feed.stats.consumed, "data/skipped": _feed.stats.skipped}, step=_base + done)

                def checkpoint(done: int, _pi=pi, _feed=feed, _base=base, _opt=optimizer) -> None:
                    save_state(state_dir, model, _opt, _tracked(_pi, done, _base + done, _feed))

                fam = ", ".join(f"{k} {v:.0%}" for k, v in sorted(family_shares(records, plan).items()))
                ctx.console.print(f"phase [bold]{plan.name}[/]: {plan.steps} steps, lr {plan.optim.lr:g}, mix {fam}")
                train_steps(forward, optimizer, feed.steps(cfg.grad_accum), start=start, total=plan.steps, spec=plan.optim,
                            device=ctx.device.torch_device, hooks=LoopHooks(log, checkpoint, cfg.log_every, cfg.checkpoint_every),
                            compute_dtype=compute_dtype, progress=progress, description=plan.name)
                state = _tracked(pi + 1, 0, base + plan.steps, feed)
                state.cursor, state.pending = 0, []
                save_state(state_dir, model, None, state)  # phase boundary: the next phase starts a fresh optimizer
    finally:
        tracker.close()

    save_hf_checkpoint(final, model, processor)
    state.complete = True
    save_state(state_dir, model, None, state)
    summary = {"steps": state.global_step, "consumed": state.consumed, "skipped": state.skipped}
    if efficiency:
        summary["pack_efficiency"] = round(sum(efficiency) / len(efficiency), 4)
    ctx.console.print(f"sft checkpoint: {final} ({state.consumed} records trained on, {state.skipped} skipped)")
    return summary


def _tracked(phase: int, step: int, global_step: int, feed: Feed) -> TrainerState:
    return TrainerState(phase=phase, step=step, global_step=global_step, skipped=feed.stats.skipped,
                        cursor=feed.cursor, pending=list(feed.pending), consumed=feed.stats.consumed)


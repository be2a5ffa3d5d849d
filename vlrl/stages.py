"""The kernel's own stages (data, model, eval) and the eval that closes every stage.

Thin on purpose: each calls the component that does the work, writes its outputs
into the stage folder and returns a small summary for DONE.json.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from vlrl.errors import DataError, VlrlError
from vlrl.recipe import EvalSpec


def run_data(ctx) -> dict:
    st = ctx.config
    if st.path:
        from vlrl.data.io import iter_records, split_path

        # Every record of both splits is read once here (images are not opened): a bad row
        # in the eval split would otherwise stop the run only after the first training stage.
        counts: dict = {}
        for split in ("train", "eval"):
            path = split_path(Path(st.path), split)  # raises a DataError naming the folder if absent
            families = Counter(r.family for _, r in iter_records(path))
            if not families:
                raise DataError(f"file {path}: no records; expected at least one record")
            counts[split] = {"total": sum(families.values()), "family": dict(sorted(families.items()))}
        ctx.console.print(f"dataset {st.path}: {describe_counts(counts)}")
        return {"path": st.path, "counts": counts}
    from vlrl.data.synth import make_dataset

    from vlrl.data.synth.writer import held_out_keys

    exclude = frozenset().union(*(held_out_keys(ctx.inputs[f"exclude.{i}"]) for i in range(len(st.exclude))))
    manifest = make_dataset(ctx.dir, seed=st.seed, n=st.n, n_eval=st.n_eval, families_mix=st.mix, fmt=st.format, exclude=exclude)
    counts = manifest.get("counts", {})
    ctx.console.print(f"dataset written to {ctx.dir}: {describe_counts(counts)}")
    return {"counts": counts}


def describe_counts(counts: dict) -> str:
    """One line: records per split, and per family for the train split."""
    splits = ", ".join(f"{c.get('total', 0)} {name}" for name, c in counts.items())
    fams = counts.get("train", {}).get("family", {})
    return f"{splits} records" + (f" (train: {', '.join(f'{k} {v}' for k, v in fams.items())})" if fams else "")


def run_model(ctx) -> dict:
    st = ctx.config
    from vlrl.model.loading import count_parameters, load_model

    if st.path:
        path = Path(st.path)
        if not path.is_dir():
            raise VlrlError(f"stages.{ctx.name}.path: {path} is not a checkpoint folder")
        model = load_model(path, device="cpu")
        return {"path": str(path), "parameters": count_parameters(model)}
    from vlrl.data.synth import corpus_texts
    from vlrl.model.tiny import init_tiny_model

    out = ctx.checkpoint_dir
    tmp = out.with_name("checkpoint.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    init_tiny_model(tmp, corpus_texts(st.seed, st.corpus_size), preset=st.preset, seed=st.seed)
    summary: dict = {}
    if st.vision_pretrain is not None:
        summary["vision_pretrain"] = _pretrain_tower(ctx, tmp, st)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    params = count_parameters(load_model(out, device="cpu"))
    ctx.console.print(f"tiny model ({st.preset}) written to {out}: {params}")
    return {"parameters": params, **summary}


def _pretrain_tower(ctx, path: Path, st) -> dict:
    """Scene-label pretraining of the freshly built tower, written back into `path`
    (still the temporary folder: a killed stage starts over, ~2 min)."""
    from vlrl.model.loading import load_model, load_processor
    from vlrl.model.vision_pretrain import pretrain_vision

    spec = st.vision_pretrain
    # float32 whatever the device: this trains the tower and writes it back into the
    # checkpoint (an accelerator's bf16 load default would crash the float32 probe and
    # save a bf16 checkpoint; seen on an H200, 2026-12-04).
    model, processor = load_model(path, device=ctx.device.kind, dtype="float32"), load_processor(path)
    tracker = ctx.tracker()
    try:
        with ctx.console.status("vision tower: scene-label pretraining") as status:
            def log(step: int, m: dict) -> None:
                tracker.log({f"vision_pretrain/{k}": v for k, v in m.items()}, step=step)
                status.update(f"vision tower: scene-label pretraining, step {step}/{spec.steps}, loss {m['loss']:.3f}")

            out = pretrain_vision(model, processor, steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size, seed=st.seed, families=spec.families, log=log)
    finally:
        tracker.close()
    model.save_pretrained(path)
    ctx.console.print(
        f"vision tower pretrained on scene labels: {spec.steps} steps, {out['seconds']:.0f} s; held-out patch accuracy "
        f"{out['fg_accuracy_before']:.1%} -> {out['fg_accuracy']:.1%} (shapes and characters), background {out['bg_accuracy']:.1%}"
    )
    return out


def train_split_beside(data_dir: Path, split: str) -> Path | None:
    """The train split of the dataset folder being evaluated (for the answer-prior
    baseline), or None: a single file, the train split itself, or none there."""
    from vlrl.data.io import split_path

    data_dir = Path(data_dir)
    if split == "train" or not data_dir.is_dir():
        return None
    try:
        return split_path(data_dir, "train")
    except VlrlError:
        return None


def eval_checkpoint(ctx, checkpoint: Path, data_dir: Path, spec: EvalSpec) -> dict:
    """Greedy eval of a checkpoint on a held-out split; writes eval.json and prints the table."""
    from vlrl.data.io import split_path
    from vlrl.eval import describe_over_budget, evaluate, render_steps_table, render_table

    data_file = split_path(data_dir, spec.split)
    on_bad = getattr(ctx.config, "on_bad_image", "error")
    report = evaluate(
        checkpoint,
        data_file,
        batch_size=spec.batch_size,
        max_new_tokens=spec.max_new_tokens,
        limit=spec.limit,
        device=ctx.device.kind,
        on_bad_image=on_bad,
        prior_from=train_split_beside(data_dir, spec.split),
    )
    report.to_json(ctx.dir / "eval.json")
    ctx.console.print(render_table(report))
    if (steps := render_steps_table(report)) is not None:
        ctx.console.print(steps)
    if report.over_budget:
        ctx.console.print("[yellow]warning:[/] " + describe_over_budget(
            report.over_budget_cells, report.n, spec.max_new_tokens, "eval.max_new_tokens", report.longest_reference
        ), markup=True, highlight=False)
    tracker = ctx.tracker()
    try:
        flat = {"eval/accuracy": report.accuracy}
        flat.update({f"eval/accuracy/{k}": v for k, v in report.by_family.items()})
        tracker.log(flat, step=0)
    finally:
        tracker.close()
    return {"accuracy": report.accuracy, "by_family": report.by_family}


def run_eval(ctx) -> dict:
    st = ctx.config
    data = ctx.inputs.get("data")
    if data is None:
        raise VlrlError(f"stages.{ctx.name}: no data to evaluate on: set `data:` or add a data stage before it")
    spec = EvalSpec(split=st.split, limit=st.limit, batch_size=st.batch_size, max_new_tokens=st.max_new_tokens)
    return eval_checkpoint(ctx, ctx.inputs["from"], data, spec)

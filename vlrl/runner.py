"""Runs a recipe's stages in order, skipping the complete ones.

A stage is complete when its folder holds DONE.json (written last, atomically);
an interrupted stage has no DONE.json and is run again, and the stage itself
resumes from its own last checkpoint. Stage implementations are looked up by
kind as `module:function` strings so the kernel never imports trainer code.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from vlrl.device import DeviceSpec, resolve_device
from vlrl.errors import NotAvailableYet, VlrlError
from vlrl.recipe import BUILT_KINDS, DataStage, EvalSpec, Recipe, check_stages
from vlrl.tracking import Tracker

STAGE_IMPLS: dict[str, str] = {
    "data": "vlrl.stages:run_data",
    "model": "vlrl.stages:run_model",
    "pretrain": "sft.pretrain:run_stage",
    "eval": "vlrl.stages:run_eval",
    "sft": "sft.sft_stage:run_stage",
    "merge": "sft.merge:run_stage",
    "rl": "rlhf.stage:run_stage",
}
# Stages whose output is a checkpoint (and so end with an eval).
MODEL_KINDS = ("model", "pretrain", "sft", "rl", "merge")


@dataclass
class StageContext:
    """What a stage implementation gets: its config, its folder and its resolved inputs."""

    recipe: Recipe
    name: str
    dir: Path
    device: DeviceSpec
    console: Console
    inputs: dict[str, Path] = field(default_factory=dict)  # 'from' -> checkpoint dir, 'data' -> dataset dir

    @property
    def config(self) -> Any:
        return self.recipe.stages[self.name]

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoint"

    def tracker(self) -> Tracker:
        return Tracker(self.dir, self.recipe.tracking, run_name=self.recipe.name, stage=self.name)

    def seed(self) -> int:
        own = getattr(self.config, "seed", None)
        return self.recipe.seed if own is None else own


def stage_output(recipe: Recipe, name: str, base: Path) -> Path:
    """The folder a stage's consumers read: a dataset folder or a checkpoint folder."""
    st = recipe.stages[name]
    if isinstance(st, DataStage):
        return Path(st.path) if st.path else base / name
    if st.kind == "model" and getattr(st, "path", None):
        return Path(st.path)
    return base / name / "checkpoint"


def _resolve(recipe: Recipe, ref: str | None, base: Path) -> Path | None:
    if ref is None:
        return None
    if ref in recipe.stages:
        return stage_output(recipe, ref, base)
    return Path(ref)


def default_eval_data(recipe: Recipe, name: str) -> str | None:
    """Where a stage's eval reads from: the recipe's eval.data, else the stage's own data,
    else the first data stage."""
    st = recipe.stages[name]
    data = recipe.eval.data or getattr(st, "data", None)
    return data or next((n for n, s in recipe.stages.items() if s.kind == "data"), None)


def resolve_inputs(recipe: Recipe, name: str, base: Path) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    for key, ref in stage_refs(recipe, name):
        p = _resolve(recipe, ref, base)
        if p is not None:
            inputs[key] = p
    return inputs


def stage_refs(recipe: Recipe, name: str) -> list[tuple[str, str | None]]:
    """(recipe key, reference) of every stage or folder a stage reads besides a merge's parts
    (the merge stage checks those itself). An eval stage without `data` reads the default
    eval data, which the pool must wait for like any other input."""
    st = recipe.stages[name]
    data = getattr(st, "data", None)
    if data is None and st.kind == "eval":
        data = default_eval_data(recipe, name)
    return [("from", getattr(st, "from_", None)), ("data", data), *_extra_refs(st)]


def _extra_refs(st) -> list[tuple[str, str]]:
    """References besides `from` and `data`, keyed as in the recipe: a pretraining phase's
    own `data` (`phases.2.data`) and a data stage's `exclude` list (`exclude.0`)."""
    refs = [(f"phases.{i}.data", ph.data) for i, ph in enumerate(getattr(st, "phases", None) or []) if getattr(ph, "data", None)]
    return refs + [(f"exclude.{i}", ref) for i, ref in enumerate(getattr(st, "exclude", None) or [])]


def eval_spec_for(recipe: Recipe, name: str) -> EvalSpec | None:
    """The eval that closes a stage, or None (stage kind without a model, or eval: false)."""
    st = recipe.stages[name]
    if st.kind not in MODEL_KINDS or st.eval is False:
        return None
    spec = st.eval if isinstance(st.eval, EvalSpec) else recipe.eval
    data = spec.data or default_eval_data(recipe, name)
    if data is None:
        return None
    return spec.model_copy(update={"data": data})


def eval_target(recipe: Recipe, name: str, base: Path) -> tuple[EvalSpec, Path] | None:
    """The eval that closes a stage and the dataset folder it reads, or None."""
    spec = eval_spec_for(recipe, name)
    if spec is None:
        return None
    return spec, _resolve(recipe, spec.data, base)


def is_complete(stage_dir: Path) -> bool:
    return (stage_dir / "DONE.json").is_file()


def _finished(stage_dir: Path) -> float | None:
    """When a complete stage's output was finished (its DONE.json), or None."""
    try:
        return json.loads((stage_dir / "DONE.json").read_text()).get("finished")
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _load_impl(kind: str) -> Callable[[StageContext], dict]:
    if kind not in BUILT_KINDS or kind not in STAGE_IMPLS:
        built = ", ".join(BUILT_KINDS)
        raise NotAvailableYet(f"stage kind {kind!r} is not available yet in this version of vlrl (available: {built})")
    module, fn = STAGE_IMPLS[kind].split(":")
    return getattr(importlib.import_module(module), fn)


def run_stage(recipe: Recipe, name: str, *, console: Console | None = None, base: Path | None = None, require_inputs: bool = True) -> dict:
    """Run one stage (resuming it if it was interrupted), then its eval; write DONE.json."""
    console = console or Console()
    base = base or recipe.base_dir()
    stage_dir = base / name
    st = recipe.stages[name]
    impl = _load_impl(st.kind)
    if require_inputs:
        for ref_key, ref in stage_refs(recipe, name):
            if ref in recipe.stages and not is_complete(base / ref) and not getattr(recipe.stages[ref], "path", None):
                raise VlrlError(f"stage {name!r} needs stage {ref!r} ({ref_key}), which is not complete; run `vlrl run` or `vlrl stage {ref}` first")
    device = resolve_device(recipe.device)
    device.configure(recipe.threads)
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(recipe, name, stage_dir, device, console, resolve_inputs(recipe, name, base))
    console.rule(f"[bold]stage {name}[/] ({st.kind})")
    t0 = time.time()
    summary = impl(ctx) or {}
    target = eval_target(recipe, name, base)
    if target is not None and "eval" not in summary:  # a stage may have run its own (merge compares its parts)
        from vlrl.stages import eval_checkpoint

        spec, data_dir = target
        summary["eval"] = eval_checkpoint(ctx, stage_output(recipe, name, base), data_dir, spec)
        start = getattr(st, "from_", None)
        if isinstance(start, str) and start in recipe.stages:
            from vlrl.eval_diff import compare_with_start

            rows, note = compare_with_start(stage_dir, base / start)
            if note:
                console.print(note)
            if rows:
                summary["vs_start"] = {r.group: {"delta": r.delta, "ci": [r.ci_low, r.ci_high], "p": r.p_value} for r in rows}
    from vlrl.stage_pool import stage_deps

    # Which output of each input this one was made from (a dataset folder's stage may not have run).
    inputs = {d: t for d in stage_deps(recipe, name) if (t := _finished(base / d)) is not None}
    done = {"stage": name, "kind": st.kind, "fingerprint": recipe.stage_fingerprint(name), "seconds": round(time.time() - t0, 1), "finished": time.time(),
            "inputs": inputs, "summary": summary}
    if device.kind == "cpu":  # a CPU step's floats can depend on it: a rerun elsewhere with another count may differ
        import torch

        done["threads"] = torch.get_num_threads()
    _write_json_atomic(stage_dir / "DONE.json", done)
    return done


def run_recipe(
    recipe: Recipe, *, console: Console | None = None, force: list[str] | None = None, only: list[str] | None = None, source: str | None = None
) -> list[dict]:
    """The whole chain: complete stages are skipped (a changed config is reported), others run.
    `source`: the recipe file, named in the errors of the checks made before any stage starts."""
    console = console or Console()
    base = recipe.base_dir()
    from vlrl.stage_pool import stage_deps

    results: dict[str, dict] = {}
    to_run: list[str] = []
    replaced: list[str] = []
    stale: list[str] = []  # complete stages skipped although a stage they read runs again now
    for name in recipe.stages:
        if only and name not in only:
            continue
        stage_dir = base / name
        if is_complete(stage_dir) and name not in (force or []):
            done = json.loads((stage_dir / "DONE.json").read_text())
            flag = "--force" if only == [name] else f"--force {name}"  # `vlrl stage NAME` takes a bare --force
            note = ""
            if done.get("fingerprint") != recipe.stage_fingerprint(name):
                note = f" [yellow](its config changed since; rerun with {flag})[/]"
            # Said because nothing else would: its output stays the one made from the old input.
            made_from = done.get("inputs") or {}
            redone = [d for d in stage_deps(recipe, name) if d in stale or (d in made_from and made_from[d] != _finished(base / d))
                      or (d in to_run and (d in (force or []) or not getattr(recipe.stages[d], "path", None)))]  # a folder's first run changes nothing
            if redone:
                stale.append(name)
                note += f" [yellow](made from an earlier output of {redone[0]}; {flag} redoes it)[/]"
            console.print(f"[dim]stage {name}: complete, skipped[/]{note}")
            results[name] = done
            continue
        if name in (force or []) and stage_dir.exists():
            replaced.append(name)
        to_run.append(name)
    # Before any stage starts (hours before RL, say) and before --force moves output aside.
    check_stages(recipe, to_run, source=source)
    base.mkdir(parents=True, exist_ok=True)
    (base / "recipe.resolved.json").write_text(recipe.model_dump_json(indent=2, by_alias=True))
    for name in replaced:
        # Keep the old output beside the new one rather than deleting work.
        moved = (base / name).with_name(f"{name}.replaced-{int(time.time())}")
        (base / name).rename(moved)
        console.print(f"[yellow]stage {name}: --force, previous output moved to {moved}[/]")
    if recipe.parallel > 1 and len(to_run) > 1:
        from vlrl.stage_pool import run_parallel

        results.update(zip(to_run, run_parallel(recipe, to_run, base, console, recipe.parallel)))
    else:
        for name in to_run:
            results[name] = run_stage(recipe, name, console=console, base=base)
    return [results[n] for n in recipe.stages if n in results]

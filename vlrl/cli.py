"""The `vlrl` command line.

User errors (VlrlError) print as one red line and exit 2, with no traceback;
anything else is a bug and keeps its traceback. Heavy imports (torch, transformers)
happen inside commands so `vlrl validate` and `--help` stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from vlrl.errors import VlrlError

app = typer.Typer(
    help="vlrl: recipe-driven post-training for vision-language models (pretrain, SFT, GRPO).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Build models.", no_args_is_help=True)
data_app = typer.Typer(help="Make datasets.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")

# Sub-command groups owned by other packages, mounted when importable.
SUBCOMMANDS = {"rewards": ("rewards.cli", "app", "Reward plugins: list and test.")}

console = Console()
err_console = Console(stderr=True)

OverridesArg = typer.Argument(None, help="dotted overrides, e.g. pretrain.optim.lr=3e-4 device=cpu")


@app.command()
def validate(recipe: Path, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Check a recipe (keys, types, stage references, reward plugins) without running anything."""
    from vlrl.recipe import BUILT_KINDS, check_stages, load_recipe

    r = load_recipe(recipe, overrides or [])
    notes = check_stages(r, source=str(recipe))
    console.print(f"[green]ok[/]: {recipe} — {len(r.stages)} stage(s): " + " -> ".join(f"{n} ({s.kind})" for n, s in r.stages.items()))
    for note in notes:
        console.print(note, highlight=False)
    for n, s in r.stages.items():
        if s.kind not in BUILT_KINDS:
            console.print(f"[yellow]note[/]: stage {n!r} has kind {s.kind!r}, which is not available yet in this version; `vlrl run` will stop there")


@app.command()
def run(
    recipe: Path,
    overrides: Optional[list[str]] = OverridesArg,
    force: list[str] = typer.Option([], "--force", help="rerun this stage even if complete (old output is kept aside)"),
) -> None:
    """Run every stage of a recipe in order; complete stages are skipped, an interrupted one resumes."""
    from vlrl.recipe import load_recipe
    from vlrl.runner import run_recipe

    r = load_recipe(recipe, overrides or [])
    unknown = [f for f in force if f not in r.stages]
    if unknown:
        raise VlrlError(f"--force {unknown[0]!r}: no such stage (stages: {', '.join(r.stages)})")
    run_recipe(r, console=console, force=force, source=str(recipe))
    console.print(f"[green]done[/]: {r.base_dir()}")


@app.command()
def stage(
    name: str,
    recipe: Path,
    overrides: Optional[list[str]] = OverridesArg,
    force: bool = typer.Option(False, "--force", help="rerun the stage even if complete (old output is kept aside)"),
) -> None:
    """Run one stage of a recipe (its inputs must be complete); a complete stage is skipped, an interrupted one resumes."""
    from vlrl.recipe import load_recipe
    from vlrl.runner import run_recipe

    r = load_recipe(recipe, overrides or [])
    if name not in r.stages:
        raise VlrlError(f"{recipe}: no stage named {name!r} (stages: {', '.join(r.stages)})")
    # Through the runner, as `vlrl run` does: running a complete stage again would rewrite its
    # DONE.json with the current config's fingerprint over a checkpoint trained on the old one.
    run_recipe(r, console=console, force=[name] if force else [], only=[name], source=str(recipe))


@model_app.command("init")
def model_init(
    out: Path = typer.Option(..., "--out", help="folder for the Hugging Face checkpoint"),
    preset: str = typer.Option("tiny", "--preset"),
    seed: int = typer.Option(0, "--seed"),
    corpus_size: int = typer.Option(20000, "--corpus-size", help="synthetic texts for the tokenizer"),
) -> None:
    """Build the in-repo tiny Qwen2.5-VL model (tokenizer trained on the synthetic corpus)."""
    from vlrl.data.synth import corpus_texts
    from vlrl.model.loading import count_parameters, load_model
    from vlrl.model.tiny import init_tiny_model

    init_tiny_model(out, corpus_texts(seed, corpus_size), preset=preset, seed=seed)
    console.print(f"[green]ok[/]: {out} {count_parameters(load_model(out, device='cpu'))}")


@data_app.command("make")
def data_make(
    out: Path = typer.Option(..., "--out"),
    seed: int = typer.Option(0, "--seed"),
    n: int = typer.Option(4000, "--n", help="train records"),
    n_eval: int = typer.Option(300, "--n-eval", help="held-out eval records"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or parquet"),
) -> None:
    """Write the synthetic task world (perception, reasoning, text) with train and eval splits."""
    from vlrl.data.synth import make_dataset

    if fmt not in ("jsonl", "parquet"):
        raise VlrlError(f"--format {fmt!r}: expected jsonl or parquet")
    from vlrl.stages import describe_counts

    manifest = make_dataset(out, seed=seed, n=n, n_eval=n_eval, fmt=fmt)
    console.print(f"[green]ok[/]: {out}: {describe_counts(manifest.get('counts', {}))}")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., "--model", help="checkpoint folder"),
    data: Path = typer.Option(..., "--data", help="dataset folder or a .jsonl/.parquet file"),
    split: str = typer.Option("eval", "--split"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    device: str = typer.Option("auto", "--device"),
    resolutions: Optional[str] = typer.Option(
        None, "--resolutions", help="test-time resolution search over a min/max pixel grid: tiny, mindvl, or MIN,..:MAX,.. in image tokens"
    ),
    samples: Optional[int] = typer.Option(
        None, "--samples", min=1, help="sample this many responses per record (the RL stage's engine) and report pass@1 .. pass@N instead of greedy accuracy"
    ),
    temperature: float = typer.Option(1.0, "--temperature", help="with --samples"),
    top_p: float = typer.Option(1.0, "--top-p", help="with --samples"),
    seed: int = typer.Option(0, "--seed", help="with --samples: batch b samples with seed + b"),
) -> None:
    """Greedy-decode the held-out set and print accuracy by family and difficulty
    (or, with --samples, pass@k: what RL at that temperature can turn into pass@1)."""
    from vlrl.data.io import split_path
    from vlrl.device import resolve_device
    from vlrl.eval import describe_over_budget, evaluate, render_steps_table, render_table
    from vlrl.stages import train_split_beside

    data_file = data if data.is_file() else split_path(data, split)
    prior_from = train_split_beside(data, split)  # answer-prior baseline columns when there is one
    spec = resolve_device(device)
    spec.configure()
    if samples is not None:
        from vlrl.sampled_eval import render_sampled_table, sampled_eval

        found = sampled_eval(
            model, data_file, samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            batch_size=batch_size, limit=limit, seed=seed, device=spec.kind, prior_from=prior_from,
        )
        console.print(render_sampled_table(found))
        if json_out:
            found.to_json(json_out)
        return
    if resolutions is not None:
        from vlrl.resolution import parse_grid, render_resolution_table, resolution_search

        grid = parse_grid(resolutions)
        found = resolution_search(model, data_file, grid=grid, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, device=spec.kind)
        console.print(render_resolution_table(found))
        if json_out:
            found.to_json(json_out)
        return
    report = evaluate(
        model, data_file, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, device=spec.kind, prior_from=prior_from
    )
    console.print(render_table(report))
    if (steps := render_steps_table(report)) is not None:
        console.print(steps)
    if report.over_budget:
        text = describe_over_budget(report.over_budget_cells, report.n, max_new_tokens, "--max-new-tokens", report.longest_reference)
        console.print("[yellow]warning:[/] " + text, highlight=False)
    if json_out:
        report.to_json(json_out)


@app.command()
def compare(
    base: Path = typer.Argument(..., help="eval report of the starting checkpoint (eval JSON, or a stage folder with eval.json)"),
    new: Path = typer.Argument(..., help="eval report of the checkpoint to judge, scored on the same records"),
    by: str = typer.Option("family", "--by", help="family or task"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the paired scores as JSON"),
) -> None:
    """Paired comparison of two evals on the same records: the change per family (or task)
    with its 95% interval and an exact McNemar p-value, to tell a gain from noise."""
    import json

    from rich.table import Table

    from vlrl.eval_diff import diff_reports, load_report, steps_markdown

    a, b = load_report(base), load_report(new)
    rows = diff_reports(a, b, by=by)
    table = Table(title=f"{b['_path']} vs {a['_path']} (paired, same records)",
                  caption="+ / -: records only the new / only the base gets right; p: exact McNemar")
    table.add_column(by, no_wrap=True)
    for col in ("n", "base %", "new %", "Δ pts", "95% CI", "+ / -", "p"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        if r.group == "all":
            table.add_section()
        table.add_row(r.group, str(r.n), f"{100 * r.base_correct / r.n:.1f}", f"{100 * r.new_correct / r.n:.1f}",
                      f"{100 * r.delta:+.1f}", f"[{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}]",
                      f"{r.new_only} / {r.base_only}", f"{r.p_value:.3g}")
    console.print(table)
    steps = steps_markdown(a, b)
    if steps:
        console.print("worked steps, % of responses (base -> new):\n" + steps, highlight=False, markup=False)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps([r.model_dump() for r in rows], indent=2) + "\n")


@app.command()
def merge(
    checkpoints: list[Path] = typer.Argument(..., help="two or more checkpoint folders of one architecture"),
    out: Path = typer.Option(..., "--out", help="folder for the merged checkpoint"),
    weights: Optional[str] = typer.Option(None, "--weights", help="comma-separated weights, one per checkpoint (default equal)"),
) -> None:
    """Average checkpoints' weights (MindVL's merge of SFT runs) into a new checkpoint."""
    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise VlrlError(f"--weights {weights!r}: expected comma-separated numbers, e.g. 0.5,0.5") from None
    merge_fn = getattr(importlib.import_module("sft.merge"), "merge_checkpoints")  # lazily: vlrl never imports sft
    console.print(f"[green]ok[/]: {merge_fn(checkpoints, out, parsed)}")


@app.command()
def serve(
    run_dir: Path = typer.Option(..., "--run", help="the run directory (runs/<name>)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs --token"),
    port: int = typer.Option(8765, "--port", min=1, max=65535),
    token: Optional[str] = typer.Option(None, "--token", help="every request must carry it (?token=, Bearer header or cookie)"),
    device: str = typer.Option("auto", "--device", help="device for the live side's model"),
) -> None:
    """Serve the rollout inspector (web page + JSON API) for a run."""
    serve_fn = getattr(importlib.import_module("rollout.server.app"), "serve")  # lazily: vlrl never imports rollout
    serve_fn(run_dir, host=host, port=port, token=token, device=device)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="the run directory (runs/<name>)"),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default RUN_DIR/report.html)"),
) -> None:
    """Write a self-contained HTML report of a run: curves, eval tables, ablations."""
    if not run_dir.is_dir():
        raise VlrlError(f"{run_dir}: not a run directory (no such folder)")
    write_report = getattr(importlib.import_module("rollout.server.report"), "write_report")
    console.print(f"[green]ok[/]: {write_report(run_dir, out)}")


@app.command()
def ablate(
    recipe: Path,
    overrides: Optional[list[str]] = OverridesArg,
    stage_name: Optional[str] = typer.Option(None, "--stage", help="the rl stage to ablate (default: the recipe's only rl stage)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="RL steps per variant (default: the stage's)"),
    variants: Optional[str] = typer.Option(None, "--variants", help="comma-separated subset, e.g. plain,anchor,all"),
) -> None:
    """Hybrid RL ablation: plain GRPO, each hybrid term alone and all together, from the same
    checkpoint and budget; writes RUN_DIR/ablation.json, ablation.md and plots."""
    run_ablation = getattr(importlib.import_module("rlhf.ablation"), "run_ablation")
    only = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    out = run_ablation(recipe, overrides or [], stage=stage_name, steps=steps, only=only, console=console)
    console.print(f"[green]ok[/]: {out}")


def _mount_subcommands() -> None:
    for name, (module, attr, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue  # that package is not installed; its commands are simply absent
        sub = getattr(importlib.import_module(module), attr)
        app.add_typer(sub, name=name, help=help_text)


_mount_subcommands()


def main() -> None:
    # Models come from local folders only; never let a typo turn into a hub download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers' per-load progress bars drown the stage output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except VlrlError as e:
        # escape: a message names paths and values, whose [brackets] rich would take for markup and drop
        err_console.print(f"[bold red]error[/]: {escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()

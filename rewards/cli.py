"""`vlrl rewards list` and `vlrl rewards test SPEC --data FILE.jsonl`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlrl.errors import VlrlError

app = typer.Typer(help="Reward plugins: list them, try one on a file of responses.", no_args_is_help=True)


def _fail(msg: str) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command("list")
def list_cmd() -> None:
    """List registered reward plugins and those installed through the `vlrl.rewards` entry points."""
    from rewards.api import fmt_bounds
    from rewards.registry import REGISTRY, entry_points

    table = Table(title="reward plugins")
    for col in ("name", "kind", "form", "runs in", "correct at", "bounds", "description"):
        table.add_column(col, overflow="fold")
    rows = [(s.name, s) for s in REGISTRY.specs()]
    for name, ep in sorted(entry_points().items()):
        if REGISTRY.get(name) is None:
            try:
                rows.append((name, REGISTRY.resolve(name)))
            except Exception as e:  # show a broken plugin instead of hiding it
                table.add_row(name, "?", "?", "?", "", "", f"[red]cannot load ({escape(ep.value)}): {escape(str(e))}[/red]")
    for name, s in rows:
        form = ("async " if s.is_async else "") + ("batched" if s.batched else "per sample") + (", class" if s.is_class else "")
        if s.needs_scores:
            form += ", after scores"
        table.add_row(name, s.kind, form, "pool" if s.isolate else "in-process", "" if s.correct_at is None else f"{s.correct_at:g}",
                      "" if s.bounds is None else fmt_bounds(s.bounds), escape(s.description))
    Console(width=160).print(table)


@app.command("test")
def test_cmd(
    spec: str = typer.Argument(..., help="plugin: a registered name, module:function, path/file.py:function; or a stack config .yaml/.json"),
    data: Path = typer.Option(..., "--data", help="JSONL rows with at least response and answer (or a dataset record plus response)"),
    group_size: int = typer.Option(1, "--group-size", min=1, help="rows without a group id form groups of this many, in order"),
    args: Optional[str] = typer.Option(None, "--args", help='plugin options as JSON, e.g. \'{"n": 2}\''),
    timeout: float = typer.Option(5.0, "--timeout", help="seconds per call"),
    workers: int = typer.Option(2, "--workers", min=0, help="pool processes (0: in-process, where a stuck call cannot be stopped)"),
    limit: int = typer.Option(50, "--limit", min=1, help="rows shown in the table"),
) -> None:
    """Score every row of FILE with SPEC; print per-sample components, failures and timing.
    Exits 1 if any sample's reward failed (raised, timed out, returned no number)."""
    from rewards.data import load_samples
    from rewards.stack import RewardStack

    try:
        options = json.loads(args) if args else {}
        if not isinstance(options, dict):
            raise ValueError("must be a JSON object")
    except ValueError as e:
        _fail(f"--args: {e}")
    try:
        samples = load_samples(data, group_size=group_size)
        if spec.endswith((".yaml", ".yml", ".json")) and ":" not in spec:
            cfg = _read_config(Path(spec))
            cfg.setdefault("timeout", timeout)
            cfg.setdefault("workers", workers)
        else:
            name = spec.rsplit(":", 1)[-1]
            cfg = {"components": {name: {"fn": spec, "args": options}}, "timeout": timeout, "workers": workers}
        t0 = time.perf_counter()
        with RewardStack.from_config(cfg) as stack:
            stack.start()
            t_load = time.perf_counter() - t0
            t1 = time.perf_counter()
            results = stack.score(samples)
            elapsed = time.perf_counter() - t1
            metrics = stack.metrics()
    except VlrlError as e:
        _fail(str(e))
        return
    _print_results(samples, results, limit)
    n_fail = sum(1 for r in results if r.failures)
    console = Console(width=160)
    console.print(
        f"{len(samples)} samples in {elapsed:.2f}s ({len(samples) / elapsed if elapsed else float('nan'):.1f} samples/s; "
        f"start {t_load:.2f}s); mean total {metrics.get('reward/total/mean', float('nan')):.4g}; "
        f"{n_fail} with failures; pool timeouts {metrics.get('reward/pool/timeouts', 0):g}, crashes {metrics.get('reward/pool/crashes', 0):g}",
        highlight=False,
    )
    if n_fail:
        # A test: a plugin that fails on a row fails the command, so a script or CI sees it.
        failing = sorted({k for r in results for k in r.failures})
        _fail(f"{n_fail} of {len(samples)} samples had failures (components: {', '.join(failing)}); see the failures column")


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise VlrlError(f"{path}: no such stack config file")
    import yaml

    from vlrl.recipe import UniqueKeyLoader

    text = path.read_text(encoding="utf-8")
    try:
        cfg = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=UniqueKeyLoader)
    except json.JSONDecodeError as e:
        raise VlrlError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:  # one line, as for recipes, not a traceback
        mark = getattr(e, "problem_mark", None)
        raise VlrlError(f"{path}:{f' line {mark.line + 1}:' if mark else ''} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if isinstance(cfg, dict) and "rewards" in cfg and isinstance(cfg["rewards"], dict):
        cfg = cfg["rewards"]
    if isinstance(cfg, dict) and "stages" in cfg:
        raise VlrlError(f"{path}: a recipe, not a stack config; put its RL stage's rewards: section in a file of its own (vlrl validate checks it in the recipe)")
    if not isinstance(cfg, dict):
        raise VlrlError(f"{path}: expected a mapping of reward stack settings")
    return cfg


def _print_results(samples, results, limit: int) -> None:
    names = list(dict.fromkeys(k for r in results for k in r.components))
    table = Table(title="rewards per sample", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("task")
    table.add_column("answer", max_width=16, overflow="ellipsis")
    table.add_column("response", max_width=36, overflow="ellipsis", no_wrap=True)
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("total", justify="right")
    table.add_column("ms", justify="right")
    table.add_column("failures", max_width=48, overflow="fold")
    for i, (s, r) in enumerate(zip(samples, results)):
        if i >= limit:
            break
        cells = []
        for n in names:
            v = r.components.get(n, "")
            cell = "" if v == "" else ("n/a" if v is None else f"{v:.4g}")
            cells.append(f"[red]{cell}![/red]" if n in r.failures else cell)
        ms = sum(r.timings.values()) * 1e3
        fails = "; ".join(f"{k}: {v}" for k, v in r.failures.items())
        resp = s.response.replace("\n", " ")
        table.add_row(str(i), escape(s.task), escape(str(s.answer)), escape(resp[:200]), *cells, f"{r.total:.4g}", f"{ms:.1f}", escape(fails))
    console = Console(width=160)
    console.print(table)
    if len(samples) > limit:
        console.print(f"... {len(samples) - limit} more rows (use --limit)")

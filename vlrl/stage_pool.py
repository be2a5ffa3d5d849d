"""Runs a recipe's stages concurrently, each in its own process, when their inputs are ready.

Why: a recipe has stages that do not depend on each other (an SFT run and its ablations;
the RL stage and the ablation that trains while it runs; data stages), and a machine with
more cores or accelerators than one stage uses well. On the tiny recipe's 2 cores, the
tiny model's matmuls are too small for intra-op threads to pay, so two stages at once
finish sooner than one after the other (bench/bench_parallel_stages.py measures it).

With `parallel: N` the runner keeps up to N stages running. A stage starts once every stage
it reads (`from`, `data`, a phase's `data`, `exclude`, and the data its closing eval reads)
is complete, in recipe order among those ready. On an accelerator machine each gets an
equal, disjoint share of the devices (so there, at most one stage per device).

Every stage computes with the threads it would have alone (the recipe's `threads`, else
torch's default), whatever runs beside it, so `parallel` changes when a stage finishes and
never what it computes. On some CPUs a training step's floats depend on the thread count
(reductions are split per thread): the pool used to split the cores among the running
stages and hand a stage more when its neighbour ended, at a step that depended on timing,
and two runs of one recipe then differed.

A stage started beside another waits for its threads without spinning
(OMP_WAIT_POLICY=PASSIVE, unless the environment sets it): two processes' spinning OpenMP
threads on the same cores took 5x as long as running one after the other. A stage started
alone keeps the spinning wait (passive waiting made a lone stage 1.3x slower), and it stays
alone: only the end of a running stage makes
another ready. Measured on 2 cores (bench/bench_parallel_stages.py): two SFT stages at once
this way finish 1.16-1.21x sooner than one after the other, where one thread each did 1.26x.

A stage's output goes to `<stage>/stage.log` and is printed as one block when it ends, so
logs never interleave.

Nothing done is lost when something fails: a failing stage stops new starts, the running
ones finish (and write DONE.json), then the error names the stage and shows its log's end.
A child dies with the runner (PR_SET_PDEATHSIG), so a killed `vlrl run` leaves no stage
running on its own and the rerun resumes every interrupted stage from its checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

import vlrl
from vlrl.errors import VlrlError
from vlrl.recipe import Recipe

LOG_NAME = "stage.log"
LAUNCH_NAME = "launch.json"
# The child imports this very vlrl, whatever the working directory holds (`python -m` would
# put the working directory first, and a checkout there would be imported instead).
CHILD_CODE = "import sys; sys.path.insert(0, {root!r}); from vlrl.stage_child import main; sys.exit(main(sys.argv[1:]))"


def stage_deps(recipe: Recipe, name: str) -> list[str]:
    """The recipe's stages this stage reads, in recipe order."""
    from vlrl.runner import eval_spec_for, stage_refs

    st = recipe.stages[name]
    refs = [ref for _, ref in stage_refs(recipe, name)] + list(getattr(st, "parts", None) or [])  # merge keeps its `from` list as parts
    spec = eval_spec_for(recipe, name)
    if spec is not None:
        refs.append(spec.data)
    wanted = {r for r in refs if isinstance(r, str) and r in recipe.stages and r != name}
    return [n for n in recipe.stages if n in wanted]


def slots_for(kind: str, count: int, parallel: int) -> int:
    """Stages at once: `parallel` on CPU; on accelerators at most one per device, since two
    stages on one device contend for its memory (a vLLM engine takes most of it)."""
    return parallel if kind == "cpu" else max(1, min(parallel, count))


def device_share(count: int, parallel: int, slot: int) -> list[int] | None:
    """Accelerator indices of a slot: disjoint equal shares when there are enough devices,
    else None (every stage sees every device and they share)."""
    if count < parallel or parallel <= 1:
        return None
    per = count // parallel
    return list(range(slot * per, (slot + 1) * per))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: a killed runner may leave the stage to finish on its own


@dataclass
class _Running:
    name: str
    proc: subprocess.Popen
    slot: int
    log: Path
    started: float


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _last_step(stage_dir: Path) -> int | None:
    """The step of the last whole line of the stage's metrics.jsonl (read from its end)."""
    path = stage_dir / "metrics.jsonl"
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int) and step > 0:
            return step
    return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_parallel(recipe: Recipe, names: list[str], base: Path, console: Console, parallel: int) -> list[dict]:
    """Run `names` (stages that need running, in recipe order); stages not in it must be complete."""
    from vlrl.device import resolve_device
    from vlrl.runner import is_complete

    device = resolve_device(recipe.device)
    wanted, parallel = parallel, slots_for(device.kind, device.count, parallel)
    if parallel < wanted:
        console.print(f"[yellow]parallel: {wanted} on {device.count} {device.kind} device(s): {parallel} stage(s) at a time, one per device[/]")
    deps = {n: stage_deps(recipe, n) for n in names}
    for n in names:
        missing = [d for d in deps[n] if d not in names and not is_complete(base / d) and not getattr(recipe.stages[d], "path", None)]
        if missing:
            raise VlrlError(f"stage {n!r} needs stage {missing[0]!r}, which is not complete and not part of this run")
    pending, running, done, failed = list(names), [], {}, None
    free_slots = list(range(parallel))

    def ready() -> list[str]:
        return [n for n in pending if all(d in done or (d not in names) for d in deps[n])]

    def start(name: str) -> None:
        slot = free_slots.pop(0)
        stage_dir = base / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        launch = stage_dir / LAUNCH_NAME
        launch.write_text(recipe.model_dump_json(by_alias=True))  # threads as the recipe says: what the stage would have alone
        env = dict(os.environ)
        if running or [n for n in ready() if n != name]:  # not alone: the cores are shared
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        share = device_share(device.count, parallel, slot) if device.kind != "cpu" else None
        if share is not None and device.visible_env:
            visible = [v for v in env.get(device.visible_env, "").split(",") if v] or [str(i) for i in range(device.count)]
            env[device.visible_env] = ",".join(visible[i] for i in share)
        log = stage_dir / LOG_NAME
        with log.open("a") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_CODE.format(root=str(Path(vlrl.__file__).resolve().parents[1])), str(launch), name, str(base)],
                stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
            )
        pending.remove(name)
        running.append(_Running(name, proc, slot, log, time.time()))
        where = f", devices {env[device.visible_env]}" if share is not None and device.visible_env else ""
        console.print(f"[bold]stage {name}[/] ({recipe.stages[name].kind}) started{where}", highlight=False)

    finished: list[tuple[str, float, str]] = []  # name, seconds, verdict

    def status() -> Text:
        """One line per running stage: how long, how far (its metrics' last step)."""
        lines = [f"{r.name}: {_clock(time.time() - r.started)}" + (f", step {s}" if (s := _last_step(base / r.name)) else "") for r in running]
        waiting = f"; waiting: {', '.join(pending)}" if pending else ""
        return Text("running " + " | ".join(lines) + waiting if lines else "", style="dim")

    live = Live(get_renderable=status, console=console, transient=True, refresh_per_second=1) if console.is_terminal else nullcontext()
    try:
        with live:
            while pending or running:
                while failed is None and free_slots and (todo := ready()):
                    start(todo[0])
                if not running:
                    break  # nothing can start: a dependency failed
                time.sleep(0.2)
                ended = [r for r in running if r.proc.poll() is not None]
                for r in ended:
                    running.remove(r)
                    free_slots.append(r.slot)
                    free_slots.sort()
                    secs = time.time() - r.started
                    console.out(r.log.read_text(errors="replace").rstrip("\n"), highlight=False)
                    verdict = "done" if r.proc.returncode == 0 else f"[red]FAILED[/] (exit {r.proc.returncode})"
                    finished.append((r.name, secs, "done" if r.proc.returncode == 0 else f"failed ({r.proc.returncode})"))
                    console.print(f"[bold]stage {r.name}[/]: {verdict} in {secs:.0f} s; log {r.log}", highlight=False)
                    if r.proc.returncode == 0 and is_complete(base / r.name):
                        done[r.name] = json.loads((base / r.name / "DONE.json").read_text())
                    elif failed is None:
                        failed = (r.name, r.proc.returncode, r.log)
                        if running:
                            console.print(f"[yellow]stage {r.name} failed; waiting for {', '.join(x.name for x in running)} to finish, starting nothing new[/]")
    except BaseException:
        for r in running:
            r.proc.terminate()
        for r in running:
            try:
                r.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
        raise
    if len(finished) > 1:
        table = Table(title="stages run at once")
        for col in ("stage", "seconds", ""):
            table.add_column(col, justify="left" if col in ("stage", "") else "right")
        for name, secs, verdict in finished:
            table.add_row(name, f"{secs:.0f}", verdict)
        console.print(table)
    if failed is not None:
        name, rc, log = failed
        raise VlrlError(f"stage {name!r} failed (exit {rc}); its log: {log}; last lines:\n{_tail(log)}")
    return [done[n] for n in names]

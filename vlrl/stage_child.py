"""One stage in its own process, started by vlrl/stage_pool.py (`main(LAUNCH_JSON, NAME, BASE)`).

The pool rewrites `<stage>/threads` when stages start or end and sends SIGUSR1; the
handler applies the new share to torch's intra-op threads. Python runs signal handlers in
the main thread between bytecodes, where torch's thread setting (an OpenMP per-thread
value) must be made, and never inside a running op.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path


def _listen(stage_dir: Path) -> None:
    from vlrl.stage_pool import APPLIED_NAME, READY_NAME, THREADS_NAME

    def apply(*_):
        try:
            n = int((stage_dir / THREADS_NAME).read_text())
        except (OSError, ValueError):
            return
        import torch

        if n >= 1 and n != torch.get_num_threads():
            torch.set_num_threads(n)  # no print here: the main thread may be inside a write to stdout
            (stage_dir / APPLIED_NAME).write_text(str(n))

    signal.signal(signal.SIGUSR1, apply)
    (stage_dir / READY_NAME).touch()


def main(argv: list[str]) -> int:
    launch, name, base = Path(argv[0]), argv[1], Path(argv[2])
    _listen(base / name)  # before anything slow: a share may change while this process starts
    from rich.console import Console
    from rich.markup import escape

    from vlrl.errors import VlrlError
    from vlrl.recipe import Recipe
    from vlrl.runner import run_stage
    from vlrl.stage_pool import THREADS_NAME

    recipe = Recipe.model_validate_json(launch.read_text())
    try:  # the share as it is now, not as it was at launch
        recipe = recipe.model_copy(update={"threads": int((base / name / THREADS_NAME).read_text())})
    except (OSError, ValueError):
        pass
    console = Console(width=100, force_terminal=False, soft_wrap=False)
    try:
        run_stage(recipe, name, console=console, base=base)
    except VlrlError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)  # its [brackets] are text, not markup
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

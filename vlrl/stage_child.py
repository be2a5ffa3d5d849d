"""One stage in its own process, started by vlrl/stage_pool.py (`main(LAUNCH_JSON, NAME, BASE)`)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    launch, name, base = Path(argv[0]), argv[1], Path(argv[2])
    from rich.console import Console
    from rich.markup import escape

    from vlrl.errors import VlrlError
    from vlrl.recipe import Recipe
    from vlrl.runner import run_stage

    recipe = Recipe.model_validate_json(launch.read_text())
    console = Console(width=100, force_terminal=False, soft_wrap=False)
    try:
        run_stage(recipe, name, console=console, base=base)
    except VlrlError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)  # its [brackets] are text, not markup
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""RL checkpoints: what a killed RL stage needs to continue exactly where it stopped.

Layout of `<stage>/state/`:
- `policy/`: the policy in Hugging Face format (save_pretrained + processor), so a
  checkpoint is also a model anyone can load or evaluate;
- `optimizer.pt`: AdamW state (by parameter index with one trainer rank, by parameter
  name, gathered, with several: torch.distributed.checkpoint's full state dict);
- `rl_state.json`: the step (completed steps), the prompt sampler's cursor, the KL
  coefficient the controller carries, the controller's RNG states, running counters.

A save goes to `state.tmp/` first and is swapped in with renames, so a SIGKILL at any
moment leaves the old state or the new one, never half of each (`find_checkpoint`
also accepts a `state.old/` left by a kill between the two renames).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from sft.state import swap_in

STATE_FILE = "rl_state.json"


def save_checkpoint(
    state_dir: Path, model: torch.nn.Module, processor, optimizer_state: dict[str, Any], state: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """`weights`: the whole tensors by state_dict name when the model itself holds FSDP2
    shards (gathered by the caller); None: the model's own."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "policy", state_dict=weights)
    processor.save_pretrained(tmp / "policy")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state))
    swap_in(tmp, state_dir)


def find_checkpoint(state_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (`state/`, or `state.old/` after a kill mid-swap)."""
    for cand in (state_dir, state_dir.with_name(state_dir.name + ".old")):
        if (cand / STATE_FILE).is_file() and (cand / "policy" / "config.json").is_file():
            return cand
    return None


def read_checkpoint(state_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    found = find_checkpoint(state_dir)
    if found is None:
        return None
    return found, json.loads((found / STATE_FILE).read_text())

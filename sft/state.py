"""Trainer state on disk: what a killed stage needs to continue exactly.

Layout of `<stage>/state/`: `model.safetensors` (all weights), `optimizer.pt`,
`trainer_state.json` (phase, step, RNG states, running counters). A save goes to a
fresh folder first and is swapped in with renames, so a SIGKILL at any moment
leaves either the old state or the new one, never half of each.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model


@dataclass
class TrainerState:
    phase: int = 0  # index of the phase in progress
    step: int = 0  # optimizer steps done in that phase
    global_step: int = 0  # optimizer steps done in the stage
    tokens: int = 0  # target tokens trained on so far
    skipped: int = 0  # samples skipped for a bad image (on_bad_image: skip)
    complete: bool = False
    # Consumed-data tracker of the phase in progress (SFT): stream positions [0, cursor)
    # were drawn; those in `pending` were drawn but not yet trained on (a packed batch
    # had no room) and lead the next batch. Pretraining leaves them at their defaults.
    cursor: int = 0
    pending: list[int] = field(default_factory=list)
    consumed: int = 0  # records trained on so far in the stage
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as JSON-able lists: what exact resume restores."""
    np_state = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state().tolist(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "numpy" in st:  # states written before numpy was recorded lack it
        npst = st["numpy"]
        np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def save_hf_checkpoint(out_dir: Path, model: torch.nn.Module, processor, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Model + processor in Hugging Face format, written beside and renamed into place,
    so a reader never sees half a checkpoint. `weights`: gathered tensors to write
    instead of the model's own (an FSDP2-sharded model)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=weights)
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def save_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainerState) -> None:
    state_dir = Path(state_dir)
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    st_save_model(model, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**asdict(state), "rng": rng_state()}))
    swap_in(tmp, state_dir)


def swap_in(tmp: Path, state_dir: Path) -> None:
    """Make the fully written folder `tmp` the new `state_dir`. The previous one is kept as
    `.old` until the swap is done, so a kill at any point leaves one complete state
    (`find_state` falls back to `.old`)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    if old.exists():
        shutil.rmtree(old)


def find_state(state_dir: Path) -> Path | None:
    """The newest complete state folder, including one left as `.old` by a kill mid-swap."""
    state_dir = Path(state_dir)
    for cand in (state_dir, state_dir.with_name(state_dir.name + ".old")):
        if (cand / "trainer_state.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


def load_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, restore_rng: bool = True) -> TrainerState | None:
    found = find_state(state_dir)
    if found is None:
        return None
    raw = json.loads((found / "trainer_state.json").read_text())
    rng = raw.pop("rng", None)
    state = TrainerState(**raw)
    st_load_model(model, str(found / "model.safetensors"))
    if optimizer is not None and (found / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(found / "optimizer.pt", weights_only=True))
    if restore_rng and rng:
        set_rng_state(rng)
    return state


def read_state(state_dir: Path) -> TrainerState | None:
    """The trainer state without touching any model (to know where a stage stands)."""
    found = find_state(state_dir)
    if found is None:
        return None
    raw = json.loads((found / "trainer_state.json").read_text())
    raw.pop("rng", None)
    return TrainerState(**raw)

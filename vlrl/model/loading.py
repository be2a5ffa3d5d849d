"""Loading models and processors from local Hugging Face directories, and naming
their parts for the freezing phases.

One loader serves the tiny model and real Qwen2.5-VL / Qwen3-VL checkpoints
(through the Auto classes), and never touches the hub: a run must not depend
on the network, and a typo in a path should fail at once with a one-line
message rather than after a download attempt.

Parts are found by parameter name, because the module tree differs between
families while the names agree in transformers 5.x:
`model.visual.*` is the vision tower, `model.visual.merger.*` (and Qwen3-VL's
`model.visual.deepstack_merger_list.*`) the projector into the language model,
everything else (`model.language_model.*`, `lm_head.*`) the language model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlrl.device import resolve_device
from vlrl.errors import VlrlError

Component = Literal["vision", "projector", "language"]
COMPONENTS: tuple[Component, ...] = ("vision", "projector", "language")

_PROJECTOR_PARTS = ("merger", "deepstack_merger_list")


def _checkpoint_dir(path: str | Path, what: str, needs: tuple[str, ...]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise VlrlError(f"{what} path {p} does not exist: expected a local Hugging Face model directory (vlrl never downloads)")
    if not p.is_dir():
        raise VlrlError(f"{what} path {p} is a file: expected a Hugging Face model directory holding {', '.join(needs)}")
    missing = [n for n in needs if not (p / n).exists()]
    if len(missing) == len(needs):
        raise VlrlError(f"{what} path {p} has none of {', '.join(needs)}: expected a Hugging Face model directory (e.g. from `vlrl model init`)")
    return p


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there and the tiny model is small);
    bfloat16 on accelerators."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def load_model(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    trainable: bool = True,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """Load an image-text-to-text model from a local directory.

    `device` is a recipe device string (auto/cpu/cuda/npu); `trainable=False`
    gives an eval-mode model with gradients off (reference / reward models).
    """
    p = _checkpoint_dir(path, "model", ("config.json",))
    spec = resolve_device(device)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise VlrlError(f"unknown dtype {dtype!r}: expected float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(spec.kind)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            p, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlrlError(f"cannot load model from {p}: {first}") from e
    model.to(spec.torch_device)
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def load_processor(path: str | Path):
    """Load the processor (tokenizer + image processor + chat template) saved
    beside a model. Pixel bounds are the checkpoint's own."""
    p = _checkpoint_dir(path, "processor", ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json"))
    try:
        processor = AutoProcessor.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlrlError(f"cannot load processor from {p}: {first}") from e
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise VlrlError(f"processor at {p} is a {type(processor).__name__}: expected a vision-language processor with an image processor and a tokenizer")
    if processor.tokenizer.pad_token_id is None:
        # Batched training and generation need a pad id; Qwen's is <|endoftext|>.
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def component_of(name: str) -> Component:
    """Which part a parameter name belongs to."""
    parts = name.split(".")
    if "visual" in parts:
        rest = parts[parts.index("visual") + 1 :]
        return "projector" if rest and rest[0] in _PROJECTOR_PARTS else "vision"
    return "language"


def component_predicate(*components: Component) -> Callable[[str], bool]:
    """A name predicate for `components`, for optimizer groups and freezing."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}: expected {COMPONENTS}")
    wanted = set(components)
    return lambda name: component_of(name) in wanted


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per component, plus total and currently trainable."""
    counts = {c: 0 for c in COMPONENTS}
    trainable = 0
    for name, param in model.named_parameters():
        counts[component_of(name)] += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {**counts, "total": sum(counts.values()), "trainable": trainable}


def set_trainable(model: nn.Module, components: Iterable[Component]) -> dict[str, int]:
    """Train only `components` (e.g. {"vision", "projector"} for warm-up,
    {"language"} for text pretraining, all three for multitask) and freeze the
    rest. Fails if a requested component has no parameters, which would mean
    the naming assumption above no longer holds for this model."""
    keep = component_predicate(*components)
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))
    counts = count_parameters(model)
    empty = [c for c in components if counts[c] == 0]
    if empty:
        raise VlrlError(f"{type(model).__name__} has no parameters for component(s) {empty}: vlrl finds them by name (model.visual.*, model.visual.merger.*)")
    return counts

"""A plain torch training loop for pretraining and SFT phases.

Departures from the HF Trainer, on purpose:
- the loss is summed over target tokens and divided by the target tokens of the
  whole optimizer step (all accumulation micro-batches), so gradient accumulation
  gives the same gradient as one big batch — HF's per-micro-batch mean does not;
- the learning rate is a pure function of the step (sft/schedule.py) and batches
  are a pure function of (seed, phase, k) (sft/sampler.py), so resume needs only
  the weights, the optimizer and the step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sft.schedule import lr_factor
from vlrl.errors import VlrlError
from vlrl.model.loading import COMPONENTS
from vlrl.recipe import OptimSpec

IGNORE = -100


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label tokens, and how many there were."""
    labels = batch["labels"]  # (B, T), IGNORE where no loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits  # (B, T, V)
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE).sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, n


def trained_components(optim: OptimSpec, where: str) -> tuple[str, ...]:
    """The components a phase trains: all but those at lr_mult 0, which are frozen instead
    (no backward through them, no share of the clipping norm)."""
    trained = tuple(c for c in COMPONENTS if optim.lr_mult.get(c, 1.0) != 0.0)
    if not trained:
        raise VlrlError(f"{where}.optim.lr_mult: every component is at 0, so the phase would train nothing")
    return trained


def make_optimizer(
    params: Iterable[tuple[str, torch.nn.Parameter]], spec: OptimSpec, component_of: Callable[[str], str] | None = None
) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and norms (1-D tensors), as is standard, and
    one group per (component, decay) so `spec.lr_mult` can scale a component's lr.
    Each group carries `lr_mult`; `optimizer_step` sets `lr * lr_mult` on it."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in params:
        if p.requires_grad:
            comp = component_of(name) if component_of else "all"
            groups.setdefault((comp, p.ndim >= 2), []).append(p)
    if spec.lr_mult and component_of is None:
        raise ValueError("optim.lr_mult needs a component_of function to tell parameters apart")
    return torch.optim.AdamW(
        [
            {"params": ps, "weight_decay": spec.weight_decay if decay else 0.0, "lr_mult": spec.lr_mult.get(comp, 1.0)}
            for (comp, decay), ps in groups.items()
        ],
        lr=spec.lr,
        betas=spec.betas,
        foreach=True,
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class StepResult:
    loss: float  # mean token loss of the step
    tokens: int  # target tokens
    input_tokens: int  # all non-pad tokens fed to the model
    grad_norm: float
    lr: float


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    lr: float,
    grad_clip: float | None,
    compute_dtype: torch.dtype = torch.float32,
) -> StepResult:
    """One optimizer step over the micro-batches of a gradient-accumulation step.
    Below float32, forward and backward run under autocast over the float32 parameters
    (see vlrl.recipe_base.TrainerPrecision)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    total = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)
    denom = max(total, 1)
    loss_sum = 0.0
    input_tokens = 0
    for mb in micro_batches:
        with compute_context(mb["input_ids"].device, compute_dtype):
            loss, _ = token_loss_sum(model, mb)
        (loss / denom).backward()
        loss_sum += float(loss.detach())
        input_tokens += int(mb["attention_mask"].sum())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if grad_clip:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum / denom, total, input_tokens, grad_norm, lr)


def compute_context(device: torch.device, dtype: torch.dtype):
    """autocast to `dtype` on `device`'s type, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prepare_for_training(model: torch.nn.Module, *, gradient_checkpointing: bool) -> torch.nn.Module:
    """Master weights in float32 whatever the checkpoint's dtype (the compute dtype is
    autocast's), and activation recomputation if asked."""
    model.float()
    if gradient_checkpointing:
        # Training forwards build no KV cache anyway; config.use_cache is left alone, as it
        # is saved with the checkpoint and would slow its generation.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_for_training(path, device_kind: str, precision) -> tuple[torch.nn.Module, torch.dtype]:
    """A checkpoint as pretraining and SFT train it: float32 weights (loaded as float32, so
    a float32 checkpoint is not rounded through bf16 on an accelerator) and the compute
    dtype of `precision` (a vlrl.recipe_base.TrainerPrecision)."""
    from vlrl.model.loading import load_model

    model = load_model(path, device=device_kind, dtype=torch.float32)
    return prepare_for_training(model, gradient_checkpointing=precision.gradient_checkpointing), getattr(torch, precision.dtype)


def lr_at(step: int, total: int, spec: OptimSpec) -> float:
    return spec.lr * lr_factor(step, total, schedule=spec.schedule, warmup=spec.warmup_steps, min_ratio=spec.min_lr_ratio, decay_ratio=spec.decay_ratio)


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@dataclass
class LoopHooks:
    """What the loop calls out to: logging every `log_every` steps, saving every `checkpoint_every`."""

    log: Callable[[int, dict], None]
    checkpoint: Callable[[int], None]
    log_every: int
    checkpoint_every: int


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[list[dict[str, torch.Tensor]]],
    *,
    start: int,
    total: int,
    spec: OptimSpec,
    device: torch.device,
    hooks: LoopHooks,
    progress: Progress | None = None,
    description: str = "train",
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Steps `start..total-1` of a phase; `batches` yields each step's micro-batches."""
    model.train()
    task = progress.add_task(description, total=total, completed=start, loss=math.nan, tps=0.0) if progress else None
    window_tokens, window_t0, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
    last: dict[str, float] = {}
    for step in range(start, total):
        micro = [to_device(mb, device) for mb in next(batches)]
        res = optimizer_step(model, optimizer, micro, lr=lr_at(step, total, spec), grad_clip=spec.grad_clip,
                             compute_dtype=compute_dtype)
        window_tokens += res.input_tokens
        window_loss += res.loss
        window_n += 1
        done = step + 1
        if done % hooks.log_every == 0 or done == total:
            dt = max(time.perf_counter() - window_t0, 1e-9)
            last = {"loss": window_loss / window_n, "lr": res.lr, "grad_norm": res.grad_norm, "tokens_per_s": window_tokens / dt}
            hooks.log(done, last)
            if progress is not None:
                progress.update(task, completed=done, loss=last["loss"], tps=last["tokens_per_s"])
            window_tokens, window_t0, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
        elif progress is not None:
            progress.update(task, completed=done)
        if done % hooks.checkpoint_every == 0 and done != total:
            hooks.checkpoint(done)
    return last

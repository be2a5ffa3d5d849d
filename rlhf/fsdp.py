"""Shard a loaded transformers model with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Why FSDP2 and per-layer units: each decoder layer (and each vision block) becomes its
own unit, so only one layer's full parameters exist at a time during forward/backward,
and the root unit holds what is left (embeddings, norm, head). Parameters become
DTensors sharded on dim 0; `full_state_dict` gathers them for a weight sync or a
checkpoint, which the rollout engines accept as-is (they call `.full_tensor()`).

The process group comes from the device module (gloo on CPU, nccl on CUDA, hccl on
NPU), so the same code runs on every backend; only the CPU/gloo path is tested here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from vlrl.device import DeviceSpec


def init_process_group(device: DeviceSpec, rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29511) -> None:
    """Join the trainers' process group with the device's backend (idempotent)."""
    if dist.is_initialized():
        return
    if device.kind != "cpu":
        getattr(torch, device.kind).set_device(rank % max(device.count, 1))
    # An explicit address, not MASTER_ADDR/MASTER_PORT: a launcher's variables must not
    # send the policy's and the reference's groups to one port.
    dist.init_process_group(device.dist_backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size)


def _units(model: nn.Module, classes: Iterable[str] | None) -> list[nn.Module]:
    """The submodules that become their own FSDP units: by class name, defaulting to the
    model's `_no_split_modules` that lie outside the vision tower (the decoder layers of
    Qwen-VL), which transformers declares for exactly this purpose.

    Why not the vision blocks too: a rank whose micro-batch has no image never calls the
    tower, so per-block units would all-gather on one rank and not on the other (a hang).
    Left in the root unit, the tower is gathered with the root at every forward on every
    rank, and `keep_grads_defined` gives its parameters zero gradients where unused, so
    every rank reduce-scatters the same tensors. The tower is small beside the language
    model (~0.7B of 7B in Qwen2.5-VL-7B), so holding it whole costs little."""
    if classes is not None:
        names = set(classes)
        return [m for m in model.modules() if type(m).__name__ in names]
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for qual, m in model.named_modules() if type(m).__name__ in names and not _in_vision(qual)]


def _in_vision(qualified_name: str) -> bool:
    return any(part in ("visual", "vision_tower", "vision_model") for part in qualified_name.split("."))


def keep_grads_defined(model: nn.Module) -> torch.Tensor:
    """0 x (sum of every trainable parameter): added to a rank's loss so each parameter
    has a gradient (zero where this micro-batch did not use it) on every rank, and
    FSDP2 reduce-scatters the same set everywhere. Call after the forward: the root unit
    stays unsharded until its backward (plain tensors, the ones that need this), while
    the decoder layers, used by every forward, are sharded again (DTensors, skipped)."""
    from torch.distributed.tensor import DTensor

    total = None
    for p in model.parameters():
        if p.requires_grad and not isinstance(p, DTensor):
            term = p.sum() * 0.0
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def rank_chunks(rows: torch.Tensor, micro_batch_size: int | None, rank: int, world: int) -> list[tuple[torch.Tensor, bool]]:
    """This rank's micro-batches of `rows` (already ordered by length): every rank gets the
    same number, since FSDP2 collectives run per forward. Rows are dealt round-robin (so
    ranks see similar lengths); a rank with fewer rows than chunks gets `(rows[:1], False)`
    fillers, forwarded with weight 0. -> [(row indices, real?)]."""
    share = rows[rank::world]
    most = -(-len(rows) // world)  # rows of the largest share
    n = 1 if micro_batch_size is None else max(1, -(-most // micro_batch_size))
    out = []
    for part in torch.tensor_split(share, n):
        out.append((part, True) if len(part) else (rows[:1], False))
    return out


def all_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum over ranks of a (B, ...) tensor each rank filled only on its own rows (zeros
    elsewhere): every rank gets the whole batch's values (on x's device; the collective
    runs on `device`, as nccl/hccl need)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        y = x.to(device)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        x = y.to(x.device)
    return x


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (small Python values: metrics)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_model(
    model: nn.Module, device: DeviceSpec, *, unit_classes: Iterable[str] | None = None, reshard_after_forward: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Shard `model` in place across the default process group's ranks (one mesh
    dimension, data parallel); returns it. Call after `init_process_group` and before
    building the optimizer (the optimizer must see the sharded parameters).

    `compute_dtype` (e.g. bfloat16) with float32 parameters: FSDP2 gathers the shards cast
    to it for forward/backward and reduces gradients in float32, so the optimizer updates
    float32 master weights (a bf16 weight would drop most updates at RL learning rates)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (rlhf.fsdp.init_process_group)")
    mesh = init_device_mesh(device.kind, (dist.get_world_size(),))
    extra = {}
    if compute_dtype is not None and compute_dtype != torch.float32:
        extra["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for unit in _units(model, unit_classes):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, **extra)
    # The root (embeddings, head, vision tower) stays gathered from its forward to its
    # backward: the backward needs it at once, and `keep_grads_defined` reaches it then.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, **extra)
    return model


def whole(t: torch.Tensor) -> torch.Tensor:
    """A detached whole tensor: an FSDP2 shard (DTensor) is gathered first (a collective:
    every rank must call it, in the same order)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def full_state_dict(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Gathered (unsharded) tensors by state_dict name; every rank gets them (collective:
    call on all ranks). `names` restricts to a subset (e.g. the trained parameters)."""
    wanted = set(names) if names is not None else None
    out = {}
    for name, t in model.state_dict().items():
        if wanted is not None and name not in wanted:
            continue
        out[name] = whole(t).clone()
    return out


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered gradients by parameter name (collective), for checks and grad norms."""
    return {
        name: whole(p.grad).clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }

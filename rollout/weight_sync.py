"""Weights from the trainer to rollout workers, as plain numpy arrays.

Why numpy: Ray stores numpy arrays in its shared-memory object store and hands them to
every worker on the node without a copy (the worker's arrays are read-only views of the
store). torch tensors would be pickled, i.e. copied once into the store and once more
out of it per worker. So the trainer `pack`s once, `ray.put`s once, and each worker
`unpack`s views and copies them straight into its model (`engine.update_weights`).

numpy has no bfloat16: such tensors travel as int16 bit patterns with their dtype
name beside them, and are viewed back without arithmetic, so the bits are exact.

This module imports torch but neither Ray nor verl (rollout/ must stay verl-free).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch

_AS_INT = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}


class PackedWeights(dict):
    """name -> numpy array, plus `dtypes`: name -> torch dtype name for bit-cast tensors."""

    dtypes: dict[str, str]

    def __reduce__(self):
        return (_rebuild, (dict(self), self.dtypes))


def _rebuild(arrays: dict, dtypes: dict) -> "PackedWeights":
    p = PackedWeights(arrays)
    p.dtypes = dtypes
    return p


def pack(named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> PackedWeights:
    """CPU numpy views/copies of the tensors (one copy for accelerator tensors)."""
    out = PackedWeights()
    out.dtypes = {}
    items = named.items() if isinstance(named, Mapping) else named
    for name, t in items:
        t = t.detach()
        if hasattr(t, "full_tensor"):  # FSDP2 DTensor
            t = t.full_tensor()
        t = t.cpu().contiguous()
        if t.dtype in _AS_INT:
            out.dtypes[name] = str(t.dtype).removeprefix("torch.")
            t = t.view(_AS_INT[t.dtype])
        out[name] = t.numpy()
    return out


def unpack(packed: Mapping[str, np.ndarray]) -> list[tuple[str, torch.Tensor]]:
    """Tensors viewing the arrays (read-only store memory: copy from them, never write)."""
    dtypes = getattr(packed, "dtypes", {}) or {}
    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, arr in packed.items():
            t = torch.from_numpy(arr)
            if name in dtypes:
                t = t.view(getattr(torch, dtypes[name]))
            out.append((name, t))
    return out

"""Decode-step plumbing for `HFEngine`: a KV cache written in place and a one-token
attention that reads it without copies.

Why (measured on the tiny model, 128 rows x 48 new tokens, one CPU thread): with
transformers' `DynamicCache` and `sdpa`, half of a decode step was not model math but
copies of the whole cache. `DynamicCache` appends with `torch.cat` (every layer's keys
and values copied every step), and with a padding mask `sdpa_attention_forward` expands
grouped-query keys/values to all heads with `repeat_kv` (another full copy per layer per
step). Here:

- `GrowingLayer` keeps keys/values in a buffer sized for the prompt plus
  `max_new_tokens`, writes each step's column in place and hands out views;
- `decode_attention` computes attention for one query token per row with the query
  heads grouped over their shared key/value head (a batched matmul on the cache view),
  and falls back to transformers' `sdpa` for anything else (prefill, the vision tower);
- the engine keeps the padding mask as a 4D boolean tensor `(R, 1, 1, capacity)`, which
  transformers passes through to attention unchanged, so no mask is rebuilt per step.

The attention function is registered under `DECODE_ATTENTION` in transformers'
attention registry (a new key; nothing existing is replaced) and switched on only for
the engine's own model, only while it decodes (`decode_attention_on`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

DECODE_ATTENTION = "vlrl_decode"


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,  # (R, H, q, D)
    key: torch.Tensor,  # (R, KV, L, D)
    value: torch.Tensor,  # (R, KV, L, D)
    attention_mask: torch.Tensor | None,  # (R, 1, q, L) bool (True = attend) or additive float, or None
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for one new token per row against the cache, heads grouped by KV head
    so no key/value is copied; any other call (prefill, dropout) goes to sdpa."""
    if query.shape[2] != 1 or dropout > 0.0 or (attention_mask is not None and attention_mask.ndim != 4):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # (R, KV, G, D): heads of a group share one KV head
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (R, KV, G, L)
    if attention_mask is not None:
        m = attention_mask[:, :, -1:, :]  # (R, 1, 1, L) broadcasts over (KV, G)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    probs = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (R, KV, G, D)
    return out.reshape(rows, 1, heads, dim), None  # (R, q=1, H, D), the layout sdpa_attention_forward returns


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


@contextmanager
def decode_attention_on(model: nn.Module) -> Iterator[None]:
    """Route the language model's attention through `decode_attention` for the duration."""
    config = model.config.get_text_config(decoder=True)
    before = config._attn_implementation
    if before not in ("sdpa", "eager"):  # flash / flex kernels: leave them alone
        yield
        return
    config._attn_implementation_internal = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation_internal = before


def decode_attention_applies(model: nn.Module) -> bool:
    """Whether switching the text config reaches the attention modules: true when some
    module with grouped KV heads reads that very config object (Qwen2.5-VL, Qwen3-VL)."""
    config = model.config.get_text_config(decoder=True)
    return any(getattr(m, "config", None) is config and hasattr(m, "num_key_value_groups") for m in model.modules())


class GrowingLayer(DynamicLayer):
    """One layer's keys/values in a preallocated (R, KV, capacity, D) buffer; `keys` /
    `values` are views of the filled part, so code reading them sees a DynamicLayer."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        rows, heads, _, dim = key_states.shape
        self._k = key_states.new_empty(rows, heads, self.capacity, dim)
        self._v = value_states.new_empty(rows, value_states.shape[1], self.capacity, value_states.shape[-1])

    def _views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:  # past the planned capacity: grow (not expected in the engine's loop)
            extra = max(end, 2 * self._k.shape[-2]) - self._k.shape[-2]
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], extra, self._k.shape[-1])], dim=-2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], extra, self._v.shape[-1])], dim=-2)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        self.length = max(0, min(self.length, max_length))
        if self.is_initialized:
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (R',). When every row that changes place comes from
        beyond the new batch size (the order `compaction_order` produces), only those
        rows are copied and the buffer shrinks to a view; otherwise rows are gathered."""
        if not self.is_initialized:
            return
        new = len(indices)
        moved = (indices != torch.arange(new, device=indices.device)).nonzero().squeeze(1)  # (M,) destinations
        sources = indices[moved]
        if bool((sources >= new).all()):
            if len(moved):
                self._k[moved, :, : self.length] = self._k[sources, :, : self.length]
                self._v[moved, :, : self.length] = self._v[sources, :, : self.length]
            self._k, self._v = self._k[:new], self._v[:new]
        else:
            self._k = _select_rows(self._k, indices, self.length)
            self._v = _select_rows(self._v, indices, self.length)
        self._views()


class GrowingCache(Cache):
    """A cache of `GrowingLayer`s, one per decoder layer."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[GrowingLayer(capacity) for _ in range(num_layers)])


def _select_rows(buf: torch.Tensor, indices: torch.Tensor, length: int) -> torch.Tensor:
    out = buf.new_empty(len(indices), *buf.shape[1:])  # (R', KV, capacity, D)
    out[:, :, :length] = buf[indices, :, :length]  # the filled part only; the rest is scratch
    return out


def compaction_order(keep: list[int], rows: int) -> list[int]:
    """An order of the surviving batch positions `keep` (sorted) that moves as few rows
    as possible: survivors beyond the new batch size fill the holes that finished rows
    leave before it, everyone else stays put. Old position of new row j: order[j]."""
    new = len(keep)
    kept = set(keep)
    holes = [j for j in range(new) if j not in kept]
    movers = [j for j in keep if j >= new]
    order = list(range(new))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return order

"""Attention over packed rows, one record at a time, for the SDPA backend.

Why: with SDPA, transformers turns a packed row into a dense block-diagonal mask,
and a masked SDPA call computes every (query, key) pair of the whole row, so a row of
512 tokens costs 512^2 per head however short its records are; on CPU that ate most
of what packing saved. Flash attention avoids it with varlen kernels (cu_seqlens); this
is the same idea for SDPA: each record's slice of the row gets its own causal SDPA
call, so the cost is the sum of the records' squares and no mask is built per layer.

How it reaches the model: `PackedForward` (vlrl.model.packing) switches the language
model's attention implementation to `ATTENTION_NAME` when it was "sdpa" and passes the
row's segments as the `packed_segments` keyword, which transformers forwards to every
attention call. Without that keyword (generation, unpacked batches, the vision tower's
own attention) the function is plain SDPA, so the switch changes nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "vlrl_packed_sdpa"

Segments = list[list[tuple[int, int]]]  # per row: (start, end) of each record, pad tail included


def segments_from_positions(text_positions: torch.Tensor) -> Segments:
    """Record boundaries of each row of a packed batch: a record starts where its text
    position restarts at 0 (vlrl.model.packing gives the pad tail its own restart)."""
    rows = []
    T = text_positions.shape[-1]
    for row in text_positions:  # (T,)
        starts = torch.nonzero(row == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        rows.append(list(zip(starts, starts[1:] + [T])))
    return rows


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> ((B, T, H, D), None), as SDPA's."""
    segments: Segments | None = kwargs.get("packed_segments")
    if segments is None or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    rows = []
    # split, not slicing: a slice's backward writes into a zero tensor of the whole row,
    # once per record per layer; split's backward is one concatenation.
    for q, k, v, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), segments):
        sizes = [e - s for s, e in row]
        parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=p, is_causal=True, scale=scaling)
                 for qs, ks, vs in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))]
        rows.append(torch.cat(parts, dim=2))
    out = torch.cat(rows, dim=0)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Idempotent: make ATTENTION_NAME known to transformers' attention and mask tables."""
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, packed_sdpa_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def language_config(model: torch.nn.Module):
    """The config whose attention implementation the language model's layers read."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is not None and hasattr(lm, "config"):
        return lm.config
    return getattr(model.config, "text_config", model.config)


def use_packed_sdpa(model: torch.nn.Module) -> bool:
    """Switch the language model from SDPA to ATTENTION_NAME; False (and no change) for
    any other backend (flash attention already packs with varlen, eager is for debugging)."""
    cfg = language_config(model)
    if cfg._attn_implementation == ATTENTION_NAME:
        return True
    if cfg._attn_implementation != "sdpa":
        return False
    register()
    cfg._attn_implementation = ATTENTION_NAME
    return True

"""Loss aggregation: how a (B, T) loss matrix becomes the scalar that is backpropagated.

Thin over verl's `core_algos.agg_loss`, so policy, KL and entropy terms share one
definition. Modes (m = response mask, L = loss, n_i = tokens of sequence i, S = sequences
with at least one token, H = loss_scale_factor, default T):

- token-mean:              sum_ij m L / sum_ij m
- token-sum:               sum_ij m L
- seq-mean-token-sum:      (1/|S|) sum_i sum_j m L
- seq-mean-token-mean:     (1/|S|) sum_i (sum_j m L) / n_i
- seq-mean-token-sum-norm: (1/|S|) sum_i sum_j m L / H     (Dr.GRPO; H fixed, e.g. max length)

`LossNorm` carries the denominators of the whole mini-batch (and the data-parallel size),
so micro-batches that each call `aggregate` add up to the mini-batch loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from verl.trainer.ppo import core_algos


@dataclass(frozen=True)
class LossNorm:
    """Global denominators for gradient accumulation and data parallelism."""

    batch_num_tokens: int | None = None  # loss-carrying tokens in the whole mini-batch (all ranks)
    global_batch_size: int | None = None  # sequences with >= 1 such token in the mini-batch (all ranks)
    dp_size: int = 1

    @classmethod
    def of(cls, response_mask: torch.Tensor, dp_size: int = 1) -> "LossNorm":
        """Denominators of a mini-batch, from its full (B, T) mask (on one rank)."""
        return cls(
            batch_num_tokens=int(response_mask.sum().item()),
            global_batch_size=int((response_mask.sum(-1) > 0).sum().item()),
            dp_size=dp_size,
        )

    def as_kwargs(self, loss_scale_factor: int | None = None) -> dict:
        """The `global_batch_info` dict verl's loss functions splat into `agg_loss`."""
        return {
            "dp_size": self.dp_size,
            "batch_num_tokens": self.batch_num_tokens,
            "global_batch_size": self.global_batch_size,
            "loss_scale_factor": loss_scale_factor,
        }


def aggregate(
    loss_mat: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    agg_mode: str,
    norm: LossNorm | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """Scalar loss; `norm=None` normalises by this batch alone."""
    return core_algos.agg_loss(
        loss_mat=loss_mat,
        loss_mask=response_mask.to(loss_mat.dtype),
        loss_agg_mode=agg_mode,
        **(norm or LossNorm()).as_kwargs(loss_scale_factor),
    )

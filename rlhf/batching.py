"""Batch shaping around the update: truncation masking, DAPO dynamic sampling, and the
epoch / mini-batch schedule.

Where we depart from DAPO:
- Overlong *filtering* only (the loss of a truncated response is masked); the soft
  overlong *penalty* is a reward term and lives in `rewards/`.
- Dynamic sampling keeps a group of one sample (no spread to judge), as verl does, and
  stops after `max_rounds` generation rounds, training on what it has rather than
  looping forever on a prompt set the policy has saturated.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def mask_truncated(
    response_mask: torch.Tensor,  # (B, T)
    finish_reasons: Sequence[str],  # (B,) "stop" | "length" | "error" | ...
    enabled: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Zero the mask of responses cut at the length limit (finish_reason == "length")."""
    if len(finish_reasons) != response_mask.shape[0]:
        raise ValueError(f"{len(finish_reasons)} finish reasons for a batch of {response_mask.shape[0]}")
    truncated = torch.tensor([r == "length" for r in finish_reasons], dtype=torch.bool, device=response_mask.device)  # (B,)
    frac = float(truncated.float().mean()) if len(finish_reasons) else 0.0
    metrics = {"batch/truncated_frac": frac}
    if not enabled:
        return response_mask, metrics
    return response_mask * (~truncated).to(response_mask.dtype).unsqueeze(-1), metrics


@dataclass(frozen=True)
class GroupFilter:
    keep: np.ndarray  # (B,) bool: sample belongs to a kept group
    kept_groups: list  # group ids in first-seen order
    dropped_groups: list

    @property
    def metrics(self) -> dict[str, float]:
        n = len(self.kept_groups) + len(self.dropped_groups)
        return {
            "sampling/kept_groups": float(len(self.kept_groups)),
            "sampling/dropped_groups": float(len(self.dropped_groups)),
            "sampling/kept_group_frac": float(len(self.kept_groups) / n) if n else 0.0,
        }


def filter_groups(group_index: Sequence[Hashable], rewards: Sequence[float], tolerance: float = 0.0) -> GroupFilter:
    """DAPO: drop groups whose rewards are all equal (max - min <= tolerance); their
    advantages are zero under every group-baseline estimator, so they only cost compute."""
    ids = list(group_index.tolist() if isinstance(group_index, np.ndarray | torch.Tensor) else group_index)
    r = np.asarray(rewards.tolist() if isinstance(rewards, torch.Tensor) else rewards, dtype=np.float64)  # (B,)
    if len(ids) != len(r):
        raise ValueError(f"{len(ids)} group ids for {len(r)} rewards")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)
    kept, dropped = [], []
    keep = np.zeros(len(ids), dtype=bool)
    for g, rows in members.items():
        vals = r[rows]
        if len(rows) == 1 or float(vals.max() - vals.min()) > tolerance:
            kept.append(g)
            keep[rows] = True
        else:
            dropped.append(g)
    return GroupFilter(keep=keep, kept_groups=kept, dropped_groups=dropped)


def fill_batch(pending: list[T], new_groups: Sequence[T], target_groups: int) -> tuple[list[T], bool]:
    """Add this round's kept groups to the ones kept so far -> (groups, full).

    When full, the list is cut to exactly `target_groups` (DAPO drops the surplus)."""
    if target_groups < 1:
        raise ValueError("target_groups must be at least 1")
    groups = list(pending) + list(new_groups)
    full = len(groups) >= target_groups
    return (groups[:target_groups] if full else groups), full


@dataclass(frozen=True)
class MiniBatch:
    epoch: int
    index: int  # position within the epoch
    indices: torch.Tensor  # (b,) long: rows of the step's batch


def minibatches(
    batch_size: int,
    mini_batch_size: int | None,
    epochs: int = 1,
    *,
    seed: int = 0,
    step: int = 0,
    shuffle: bool = True,
) -> Iterator[MiniBatch]:
    """Row indices for `epochs` passes over a batch of `batch_size`, `mini_batch_size` rows
    per optimizer step (the last one smaller when it does not divide).

    The order depends only on (seed, step, epoch), so a resumed run replays it exactly."""
    if batch_size < 1 or epochs < 1:
        raise ValueError("batch_size and epochs must be at least 1")
    size = batch_size if mini_batch_size is None else min(mini_batch_size, batch_size)
    if size < 1:
        raise ValueError("mini_batch_size must be at least 1")
    for epoch in range(epochs):
        if shuffle:
            order = np.random.default_rng([seed, step, epoch]).permutation(batch_size)
        else:
            order = np.arange(batch_size)
        for k, start in enumerate(range(0, batch_size, size)):
            yield MiniBatch(epoch=epoch, index=k, indices=torch.as_tensor(order[start : start + size], dtype=torch.long))

"""Perception terms of the hybrid RL objective: the implicit perception (visual
dependency) term and the rows the perception anchor applies to.

Visual dependency of response y to prompt (x, I), from the policy's own log-probabilities
with the real image I and with a masked image I~ of the same size:
    d_t = log pi(y_t | x, I, y_<t) - log pi(y_t | x, I~, y_<t)          per token
    d   = mean_t d_t   (per="token")   or   sum_t d_t   (per="sequence")
A large d means the answer leans on the image; d ~ 0 means it would be written blind.
Bonus added to the sequence reward before the advantage:
    b = coef * clip(d, 0, cap)     (correct responses only, with `correct_only`;
                                    0 where the mean token entropy H < min_entropy)

Where we depart from the papers: MindGPT-4ov/MiniCPM-V 4.5 do not publish a formula
for perception preservation in RL. Ours is a contrastive log-likelihood (as in
visual-contrastive decoding, here used as a reward, not at decoding time). The masked
image is the *mean image*: zero pixels after the processor's normalisation (which
subtracts the mean), so the token layout, the grid and the positions are unchanged and
only the visual content is removed. The cap and the correctness gate keep the policy
from gaming the bonus with image-specific but wrong or degenerate text; the entropy guard stops the
bonus for a response the policy has collapsed onto (H -> 0); the no-grad
forwards mean the bonus is a reward, not a differentiable term.
"""

from __future__ import annotations

import dataclasses

import torch

from rlhf.batch import PolicyBatch, _with_pixels


def masked_image_batch(batch: PolicyBatch) -> PolicyBatch:
    """The same rows with every image replaced by the mean image (zeros after
    normalisation): same grids, same placeholder tokens, no visual content."""
    if batch._pixels is None:
        return batch
    out = dataclasses.replace(batch, _pixels=torch.zeros_like(batch._pixels), pixel_values=None, image_grid_thw=None)
    return _with_pixels(out)


def token_dependency(
    logp_real: torch.Tensor,  # (B, R) log pi(y_t | image)
    logp_masked: torch.Tensor,  # (B, R) log pi(y_t | masked image)
    mask: torch.Tensor,  # (B, R) response mask
) -> torch.Tensor:
    """d_t per token (B, R), 0 off the mask."""
    return (logp_real - logp_masked) * mask


def sequence_dependency(
    logp_real: torch.Tensor,  # (B, R)
    logp_masked: torch.Tensor,  # (B, R)
    mask: torch.Tensor,  # (B, R)
    per: str = "token",
) -> torch.Tensor:
    """d per sequence (B,): mean over the response tokens ("token") or their sum ("sequence")."""
    d = token_dependency(logp_real, logp_masked, mask).sum(-1)  # (B,)
    if per == "sequence":
        return d
    if per != "token":
        raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
    return d / mask.sum(-1).clamp(min=1)


def visual_bonus(
    dependency: torch.Tensor,  # (B,) sequence dependency
    coef: float,
    cap: float,
    correct: torch.Tensor | None = None,  # (B,) bool; None = every row may earn it
    entropy: torch.Tensor | None = None,  # (B,) mean token entropy of the response
    min_entropy: float | None = None,
) -> torch.Tensor:
    """b = coef * clip(d, 0, cap) (B,), zero where `correct` is False or entropy < min_entropy."""
    b = coef * dependency.clamp(min=0.0, max=cap)
    if correct is not None:
        b = b * correct.to(b.dtype)
    if min_entropy is not None:
        if entropy is None:
            raise ValueError("min_entropy needs the responses' entropy")
        b = b * (entropy >= min_entropy).to(b.dtype)
    return b


def dependency_metrics(dependency: torch.Tensor, has_image: torch.Tensor, bonus: torch.Tensor | None, cap: float) -> dict[str, float]:
    """Per-step metrics over the rows that have an image (text rows have d = 0 by construction)."""
    rows = has_image.bool()
    if not bool(rows.any()):
        return {}
    d = dependency[rows].double()
    m = {
        "visual/dependency": float(d.mean()),
        "visual/dependency_pos_frac": float((d > 0).double().mean()),
        "visual/capped_frac": float((d >= cap).double().mean()),
    }
    if bonus is not None:
        m["visual/bonus_mean"] = float(bonus[rows].double().mean())
    return m


def anchor_rows(families: list[str]) -> torch.Tensor:
    """(B,) 1.0 on rows whose prompt is a perception record: where the anchor KL applies."""
    return torch.tensor([f == "perception" for f in families], dtype=torch.float32)

"""Learning-rate schedules as pure functions of the step.

Pure so resume needs no scheduler state (the step is enough) and tests can check
them against the formula. WSD (warm-up, stable, decay) follows MiniCPM's use in
MLLM pretraining: linear warm-up, a flat stretch, then a linear decay over the
last `decay_ratio` of the steps.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, *, schedule: str, warmup: int, min_ratio: float, decay_ratio: float = 0.2) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total`."""
    if total <= 0:
        raise ValueError("total steps must be positive")
    warmup = min(warmup, max(total - 1, 0))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(int(round(total * decay_ratio)), 1)
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}")

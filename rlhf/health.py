"""Warnings for RL runs drifting into a state that the per-step metrics show but that
nobody reads until the eval has collapsed.

Masked truncation runaway: with `algo.mask_truncated` (DAPO's overlong filtering) a
response cut at `rollout.max_tokens` leaves the loss, so a policy that drifts towards
longer answers is never pushed back; the drift feeds itself, because the longer it gets
the fewer responses are left to learn from. Measured on the tiny recipe (lr 3e-4,
temperature 0.7, docs/rl-stage.md): 0% of responses truncated at step 0, 45% by step
25-50, 98% by step 125-150, held-out accuracy 11.1% -> 4.3%. DAPO pairs the filtering
with a soft overlong penalty (the `overlong` reward term), which is what the warning
points at.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class TruncationWatch:
    """Say once when the mean truncated share over the last `window` steps reaches
    `threshold` while truncated responses are masked and nothing penalises length."""

    masked: bool
    penalised: bool
    max_tokens: int
    threshold: float = 0.25
    window: int = 10
    _recent: deque = field(default_factory=deque, repr=False)
    warned: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        self._recent = deque(maxlen=self.window)

    def update(self, step: int, truncated_frac: float | None) -> str | None:
        """Record one step's `batch/truncated_frac`; the warning text the first time the
        window is full and its mean reaches the threshold, else None."""
        if truncated_frac is None:
            return None
        self._recent.append(float(truncated_frac))
        if self.warned or not self.masked or self.penalised or len(self._recent) < self.window:
            return None
        mean = sum(self._recent) / len(self._recent)
        if mean < self.threshold:
            return None
        self.warned = True
        cache = max(1, self.max_tokens // 4)
        fix = f"reward_terms: {{overlong: {{weight: 1.0, args: {{max_length: {self.max_tokens}, cache: {cache}}}}}}}"
        return (
            f"rl step {step}: {mean:.0%} of the responses of the last {self.window} steps hit "
            f"rollout.max_tokens ({self.max_tokens}) and algo.mask_truncated drops them from the loss, "
            "so nothing pushes their length back down and the share tends to keep growing. "
            f"Add the overlong penalty ({fix}) or raise rollout.max_tokens."
        )


def length_is_penalised(reward_terms: dict, rewards: dict) -> bool:
    """True when the stack has a weighted length penalty: the `overlong` or `group_length`
    term in `reward_terms`, or a component calling one of them in `rewards`."""
    from rewards.stack import RewardStackConfig

    names = {"overlong", "group_length"}
    specs = [(spec.fn or key, spec.weight) for key, spec in reward_terms.items()]
    specs += [(c.fn, c.weight) for c in RewardStackConfig(**rewards).components.values()]
    return any(fn in names and weight != 0.0 for fn, weight in specs)

"""Rewards for vlrl: the plugin API, built-in rule and model rewards, and the hybrid stack.

    from rewards import reward, RewardSample, RewardStack

    @reward("short_answer")
    def short_answer(sample: RewardSample) -> float:
        return 1.0 if len(sample.response) < 200 else 0.0

    stack = RewardStack.from_config({"components": {"acc": "math_accuracy", "short": "short_answer"}})
    results = stack.score(samples)   # list[RewardResult]: total, components, failures

See docs/rewards.md ("Writing a reward plugin"). This package depends on the `vlrl`
kernel only; torch, transformers and Ray are imported by the model rewards when used.
"""

from rewards.api import LazyImages, PluginError, RewardError, RewardSample, RewardSpec, reward
from rewards.registry import REGISTRY, Registry
from rewards.stack import (
    DEFAULT_ROUTING,
    ComponentConfig,
    GateConfig,
    RewardResult,
    RewardStack,
    RewardStackConfig,
    summarize,
)

__all__ = [
    "DEFAULT_ROUTING",
    "REGISTRY",
    "ComponentConfig",
    "GateConfig",
    "LazyImages",
    "PluginError",
    "Registry",
    "RewardError",
    "RewardResult",
    "RewardSample",
    "RewardSpec",
    "RewardStack",
    "RewardStackConfig",
    "reward",
    "summarize",
]

"""Config of the RL stage (kept apart from vlrl/recipe.py: one stage kind per module).

Everything here is checked at `vlrl validate`, before any compute. The `rewards` section's
schema belongs to `rewards/` (which the kernel must not import), so it is passed through as
a mapping here and checked by the CLI (`vlrl validate`, `run`, `stage`) and again as the
stage starts, by rlhf/reward_config.py. See docs/rl-stage.md for every key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from vlrl.recipe_base import DataSelect, OptimSpec, PixelBounds, TrainerPrecision, _StageBase, _Strict
from vlrl.rl_config import RLAlgoConfig


class ModeSpec(_Strict):
    """A reasoning mode (MiniCPM-V 4.5 short/long): a suffix on the prompt and its own length budget."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="metric name of the mode (mode/<name>/...)")
    suffix: str = Field(..., min_length=1, description="appended to the last user message, e.g. 'Answer briefly.'")
    max_tokens: int = Field(..., ge=1, description="response cap of this mode (replaces rollout.max_tokens)")
    weight: float = Field(1.0, gt=0, description="relative chance a prompt gets this mode")


class RolloutSpec(_Strict):
    """How prompts become groups of sampled responses."""

    engine: Literal["hf", "vllm"] = Field("hf", description="rollout engine kind (rollout.engine.make_engine)")
    n: int = Field(4, ge=1, description="samples per prompt: the GRPO group size")
    prompts_per_step: int = Field(8, ge=1, description="prompts (groups) per RL step")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the trainer scales its logits by it too")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_tokens: int = Field(64, ge=1, description="response length cap; a response that hits it is 'truncated'")
    workers: int = Field(1, ge=1, description="rollout workers; a step's prompts are split between them")
    max_batch_rows: int = Field(256, ge=1, description="prompts x n decoded together per worker (memory cap)")
    suppress_input_tokens: bool = Field(
        True, description="never sample the vision placeholder tokens (input-only; a response holding one cannot be trained on)"
    )
    engine_options: dict[str, Any] = Field(default_factory=dict, description="extra keyword options for the engine's constructor")
    modes: list[ModeSpec] = Field(
        default_factory=list, description="short/long reasoning modes, one picked at random per prompt (rlhf/modes.py); empty = off"
    )

    @field_validator("modes")
    @classmethod
    def _distinct_modes(cls, v: list[ModeSpec]) -> list[ModeSpec]:
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"mode names must be distinct, got {names}")
        return v


class CurriculumPoint(_Strict):
    from_step: int = Field(0, ge=0, description="the band applies from this step on")
    difficulty: tuple[int, int] = Field(..., description="inclusive difficulty band [lo, hi], 1..5")

    @field_validator("difficulty")
    @classmethod
    def _band(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not (1 <= lo <= hi <= 5):
            raise ValueError(f"difficulty band {list(v)}: expected 1 <= lo <= hi <= 5")
        return v


class CurriculumSpec(_Strict):
    """Which train records are RL prompts at each step."""

    select: DataSelect = Field(default_factory=DataSelect, description="the prompt pool (families, tasks, difficulty)")
    schedule: list[CurriculumPoint] = Field(
        default_factory=list, description="difficulty band by step (replaces select.difficulty from each from_step on); empty = select.difficulty"
    )
    perception_share: float | None = Field(
        None, ge=0, le=1, description="share of prompts drawn from perception records (keeps perception from eroding); null = as in the pool"
    )

    @field_validator("schedule")
    @classmethod
    def _ordered(cls, v: list[CurriculumPoint]) -> list[CurriculumPoint]:
        steps = [p.from_step for p in v]
        if steps != sorted(set(steps)):
            raise ValueError(f"schedule from_step values must strictly increase, got {steps}")
        if v and v[0].from_step != 0:
            raise ValueError("the first schedule point must have from_step 0")
        return v


class RewardTermSpec(_Strict):
    """A group term of rewards/terms.py (diversity, conciseness, group_length, overlong)
    added to the reward stack on top of `rewards` (defaults included) for every record."""

    fn: str | None = Field(None, description="registered reward name; default: the term's key")
    weight: float = Field(..., description="weight in the total reward; 0 = logged only, the update is plain GRPO's")
    args: dict[str, Any] = Field(default_factory=dict, description="the term's options (e.g. diversity: n, threshold)")


class RaySpec(_Strict):
    address: str | None = Field(None, description="null: start a local Ray with this machine's CPUs; 'auto' or 'host:port': join that cluster")
    num_cpus: int | None = Field(None, ge=1, description="local start only; default: all CPUs of the machine")
    object_store_mb: int | None = Field(None, ge=64, description="local start only; default: Ray's")


class RlStage(_StageBase, TrainerPrecision, PixelBounds):
    """GRPO (and the other critic-free estimators) on Ray actors; see docs/rl-stage.md."""

    kind: Literal["rl"] = "rl"
    from_: str = Field(..., alias="from", description="the starting policy (an earlier stage or a checkpoint folder)")
    data: str = Field(..., description="data stage or dataset folder; prompts come from its train split")
    seed: int | None = None
    steps: int = Field(..., ge=1, description="RL steps (one rollout round + one update each)")
    algo: RLAlgoConfig = Field(default_factory=RLAlgoConfig)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    rewards: dict[str, Any] = Field(default_factory=dict, description="rewards.stack.RewardStackConfig; {} = built-in accuracy + format stack")
    reward_terms: dict[str, RewardTermSpec] = Field(
        default_factory=dict, description="group terms added to the stack for every record (hybrid RL: diversity, conciseness)"
    )
    optim: OptimSpec = Field(
        default_factory=lambda: OptimSpec(lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant", min_lr_ratio=1.0)
    )
    trainable: Literal["all", "language", "vision+projector", "projector"] = "all"
    micro_batch_size: int | None = Field(
        16, ge=1, description="rows per forward/backward; rows are sorted by length into micro-batches, so padding stays small; null = a whole mini-batch"
    )
    curriculum: CurriculumSpec = Field(default_factory=CurriculumSpec)
    trainer_ranks: int = Field(
        1, ge=1, description="FSDP2 ranks of the policy and reference trainers, each a Ray actor with one device; >1 needs placement colocate or split"
    )
    placement: Literal["colocate", "split", "inline"] = Field(
        "colocate",
        description="colocate: rollout workers are Ray actors, trainer/reference/rewards share the controller's process and the device in turns; "
        "split: every worker its own Ray actor; inline: no Ray, all in one process (debugging)",
    )
    ray: RaySpec = Field(default_factory=RaySpec)
    reference: Literal["auto", "on", "off"] = Field("auto", description="frozen reference model; auto = on when the KL term is enabled")
    checkpoint_every: int = Field(10, ge=1, description="steps between resumable checkpoints")
    eval_every: int | None = Field(
        None, ge=1, description="greedy held-out eval of the policy at step 0 and every N steps (curve.jsonl, heldout/* metrics); null = only the closing eval"
    )
    eval_limit: int | None = Field(None, ge=1, description="records of the eval split in each curve point (the same ones each time); default: the stage's eval limit")
    rollout_retries: int = Field(2, ge=0, description="times a step's rollout is retried after its worker died")

    @model_validator(mode="after")
    def _reference_for_kl(self) -> "RlStage":
        if self.reference == "off" and self.algo.kl.enabled:
            raise ValueError("algo.kl is enabled (coef > 0) but reference is off: set reference to auto/on, or algo.kl.coef to 0")
        if self.reference == "off" and self.algo.perception_anchor.kl_coef > 0:
            raise ValueError("algo.perception_anchor.kl_coef > 0 needs the reference model, but reference is off: set reference to auto/on")
        return self

    @model_validator(mode="after")
    def _ranks_need_ray(self) -> "RlStage":
        if self.trainer_ranks > 1 and self.placement == "inline":
            raise ValueError(f"trainer_ranks {self.trainer_ranks} needs Ray actors (one per rank): set placement to colocate or split")
        return self

    @property
    def use_reference(self) -> bool:
        wanted = self.algo.kl.enabled or self.algo.perception_anchor.kl_coef > 0
        return self.reference == "on" or (self.reference == "auto" and wanted)

"""Parts shared by every stage's config: strict models, optimizer, data selection, eval.

Split from vlrl/recipe.py so each stage kind's config can live in its own module
(vlrl/recipe_sft.py, vlrl/recipe_rl.py) without an import cycle.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- shared parts


class EvalSpec(_Strict):
    """Greedy eval on a held-out split; every training stage ends with it."""

    data: str | None = Field(None, description="data stage name or dataset folder; default: the recipe's eval.data")
    split: str = "eval"
    limit: int | None = Field(None, ge=1, description="evaluate at most this many records")
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(64, ge=1)


class TrackingSpec(_Strict):
    """Metrics always go to metrics.jsonl; these add other sinks."""

    tensorboard: bool = True
    wandb: bool = False  # offline mode unless WANDB_MODE says otherwise
    mlflow: bool = False  # file store under the run directory


class OptimSpec(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_ratio: float = Field(0.2, gt=0, le=1, description="WSD: share of steps spent decaying")
    grad_clip: float | None = Field(1.0, gt=0)
    lr_mult: dict[Literal["language", "vision", "projector"], float] = Field(
        default_factory=dict,
        description="per-component multiplier of lr (e.g. {vision: 0.1}); a ViT trained at the LM's lr inflates its output norm",
    )


Family = Literal["perception", "reasoning", "text"]  # a record's `family` (vlrl/data/records.py)
# A share per family: keyed by the closed set of families, so that a misspelt one fails at
# validate rather than weighing nothing when the stage samples.
FamilyWeights = dict[Family, Annotated[float, Field(ge=0)]]


class DataSelect(_Strict):
    """Which records of the train split a phase draws from."""

    families: list[Family] | None = None
    tasks: list[str] | None = None
    difficulty: tuple[int, int] = (1, 5)
    weights: FamilyWeights | None = Field(None, description="sampling weight per family (default: as in the data)")


class TrainerPrecision(_Strict):
    """Keys every training stage shares: what it computes in, what it recomputes.

    `dtype` is the compute dtype only: parameters, gradients and AdamW state stay
    float32, because at fine-tuning learning rates an update below half a bf16 ulp
    rounds away on bf16 parameters (tests/test_rl_precision.py measures it)."""

    # No float16: without loss scaling (which the trainers do not do) its gradients underflow.
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="compute dtype of forward/backward (bfloat16 for real models on GPU/NPU); parameters and AdamW state stay float32"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (real models: memory for compute)")


class PixelBounds(_Strict):
    """Image resize bounds of a training stage (the processor's min_pixels / max_pixels).
    The checkpoint the stage writes keeps them, so its eval and whatever starts from it see
    images as it was trained on them. None = the input checkpoint's own."""

    min_pixels: int | None = Field(None, ge=1, description="image resize bounds for this run (the processor's min_pixels / "
                                   "max_pixels; the checkpoint written keeps them); None = the input checkpoint's own. MindVL "
                                   "merges SFT runs trained at different max_pixels (see the merge stage); in RL they bound "
                                   "the image tokens of every rollout prompt")
    max_pixels: int | None = Field(None, ge=1, description="see min_pixels")

    @model_validator(mode="after")
    def _bounds_ordered(self):
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")
        return self


# --------------------------------------------------------------------------- stage base


class _StageBase(_Strict):
    kind: str
    eval: EvalSpec | bool | None = Field(None, description="eval after the stage; None = recipe default, false = off")

"""Configs of the SFT and merge stages (kept apart from vlrl/recipe.py: one stage kind per module).

The SFT stage is MindGPT-4ov's collaborative curriculum: ordered phases, each with
its own data selection, steps and optimizer, every phase replaying a share of
general (text) and perception data, and an optional closing `restore` phase that
leans on general data. docs/sft.md explains every key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from vlrl.recipe_base import DataSelect, OptimSpec, PixelBounds, TrainerPrecision, _StageBase, _Strict


class ReplaySpec(_Strict):
    """Shares of each batch drawn from outside the phase's selection, so that a phase
    that adds a skill does not erase the general ones."""

    general: float = Field(0.1, ge=0, le=1, description="share of text-family records (any difficulty)")
    perception: float = Field(0.1, ge=0, le=1, description="share of perception-family records (any difficulty)")

    @model_validator(mode="after")
    def _total(self) -> "ReplaySpec":
        if self.general + self.perception >= 1:
            raise ValueError(f"replay shares add up to {self.general + self.perception:g}; they must leave room for the phase's own data (< 1)")
        return self


class SftPhase(_Strict):
    """One curriculum phase: its data, length and optimizer."""

    name: str
    select: DataSelect = Field(default_factory=DataSelect, description="the phase's own data (families, tasks, difficulty band, family weights)")
    steps: int = Field(..., ge=1)
    optim: OptimSpec | None = Field(None, description="None = the stage's optim")
    replay: ReplaySpec | None = Field(None, description="None = the stage's replay")
    data: str | None = Field(None, description="a data stage or folder this phase's own selection draws from instead of "
                             "the stage's `data` (MindGPT-4ov: each phase its own corpus); replay stays on the stage's data")


class RestorePhase(_Strict):
    """Closing phase weighted towards general data: the rest of each batch is drawn from
    the union of the curriculum phases' selections."""

    steps: int = Field(..., ge=1)
    general: float = Field(0.5, ge=0, le=1, description="share of text-family records")
    perception: float = Field(0.25, ge=0, le=1, description="share of perception-family records")
    optim: OptimSpec | None = Field(None, description="None = the stage's optim")

    @model_validator(mode="after")
    def _total(self) -> "RestorePhase":
        if self.general + self.perception > 1:
            raise ValueError(f"restore shares add up to {self.general + self.perception:g}; expected at most 1")
        return self


class PackingSpec(_Strict):
    """Online packing of several records into fixed-length rows (vlrl/model/packing.py)."""

    enabled: bool = False
    max_length: int = Field(1024, ge=16, description="tokens per packed row")
    max_image_tokens: int | None = Field(None, ge=1, description="cap on image tokens per row (balanced packs); None = no cap")
    lookahead: int = Field(8, ge=1, description="records that fit no row before a batch is closed (they lead the next batch)")


class SftStage(_StageBase, TrainerPrecision, PixelBounds):
    kind: Literal["sft"] = "sft"
    from_: str = Field(..., alias="from")
    data: str
    phases: list[SftPhase] = Field(..., min_length=1)
    restore: RestorePhase | None = None
    curriculum: bool = Field(
        True,
        description="false = keep the phases' steps and optimizers but draw every batch from the mixture of all phases' data "
        "(weighted by their steps): the same budget and data, shuffled; the curriculum ablation",
    )
    replay: ReplaySpec = Field(default_factory=ReplaySpec)
    packing: PackingSpec = Field(default_factory=PackingSpec)
    batch_size: int = Field(16, ge=1, description="records per micro-batch; with packing, packed rows per micro-batch")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8, description="per-record token limit (truncation keeps image tokens or fails)")
    optim: OptimSpec = Field(default_factory=lambda: OptimSpec(lr=5e-4, warmup_steps=10))
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable checkpoints")
    log_every: int = Field(10, ge=1)
    on_bad_image: Literal["error", "skip"] = "error"
    seed: int | None = None

    @model_validator(mode="after")
    def _packing_fits(self) -> "SftStage":
        if self.packing.enabled and self.packing.max_length < self.max_length:
            raise ValueError(f"packing.max_length ({self.packing.max_length}) is below max_length ({self.max_length}); a record must fit one packed row")
        names = [p.name for p in self.phases]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None or "restore" in names:
            raise ValueError(f"phase names must be unique and not 'restore' (got {dup or 'restore'!r})")
        return self


class MergeStage(_StageBase):
    """Weighted average of checkpoints (MindVL: SFT runs at different lengths / max_pixels).

    `from` is a list of stage names or checkpoint folders. It is stored as `parts` (not
    `from_`) because the runner's reference check reads `from_` as one string; the
    merge stage checks its own parts when it starts.
    """

    kind: Literal["merge"] = "merge"
    parts: list[str] = Field(..., alias="from", min_length=2, description="stages or checkpoint folders to average")
    weights: list[float] | None = Field(None, description="one per part, normalised to sum 1; default equal")
    data: str | None = Field(None, description="data for the closing eval (default: the recipe's eval.data)")

    @field_validator("weights")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError(f"weights must be non-negative with a positive sum, got {v}")
        return v

    @model_validator(mode="after")
    def _one_weight_per_part(self) -> "MergeStage":
        if self.weights is not None and len(self.weights) != len(self.parts):
            raise ValueError(f"{len(self.weights)} weights for {len(self.parts)} parts; give one weight per entry of `from`")
        return self

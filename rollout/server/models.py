"""Request and response models of the inspection server (they make its OpenAPI schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rollout.store import GroupSummary, RolloutRow, StepSummary
from vlrl.data.records import Message

__all__ = ["GroupSummary", "RolloutRow", "StepSummary"]  # re-exported store models


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; bigger asks get 4xx, never work."""

    max_body_bytes: int = 8 * 2**20  # whole request body (the base64 image dominates)
    max_image_pixels: int = 4096 * 4096  # decoded upload, against decompression bombs
    max_samples: int = 16  # n of one live generation
    max_new_tokens: int = 512
    max_prompt_chars: int = 8000
    max_page: int = 500  # rows of one listing page
    live_wait_s: float = 60.0  # wait this long for a running generation, then 429


class ErrorOut(BaseModel):
    detail: str


class LimitsOut(BaseModel):
    max_body_bytes: int
    max_samples: int
    max_new_tokens: int
    max_prompt_chars: int
    max_page: int


class StageOut(BaseModel):
    name: str
    kind: str | None
    metrics: bool = Field(description="has metrics.jsonl")
    eval: bool = Field(description="has eval.json")
    done: bool = Field(description="finished (DONE.json)")
    rollouts: bool = Field(description="has a rollout store")
    checkpoint: bool = Field(description="has a loadable checkpoint")
    metrics_bytes: int = Field(0, description="size of metrics.jsonl: a poll sees it grew without downloading it")


class RunOut(BaseModel):
    name: str
    stages: list[StageOut]
    limits: LimitsOut


class StoreInfo(BaseModel):
    stage: str
    count: int
    steps: list[int]
    tasks: list[str]
    components: list[str]
    sort_keys: list[str] = Field(description="values accepted by `sort` in the listing")


class RolloutPage(BaseModel):
    total: int | None = Field(description="rows matching the filters (None when not counted)")
    offset: int
    limit: int
    rows: list[RolloutRow]


class GroupView(BaseModel):
    """All responses to one prompt in one step, side by side."""

    group_id: str
    step: int
    record_id: str
    task: str
    difficulty: int
    prompt: list[Message]
    images: list[str] = Field(description="paths relative to the run directory; GET /api/files/{path}")
    answer: str | None
    components: list[str] = Field(description="every component name any sample carries")
    reward_mean: float
    reward_std: float
    samples: list[RolloutRow]


class MetricsOut(BaseModel):
    keys: list[str] = Field(description="numeric metric names")
    rows: list[dict[str, Any]]


class CurveOut(BaseModel):
    x: list[float]
    y: list[float | None]


class CurvesOut(BaseModel):
    curves: dict[str, CurveOut]


class CheckpointOut(BaseModel):
    stage: str
    path: str = Field(description="relative to the run directory")


class LiveRequest(BaseModel):
    """Sample a checkpoint on one prompt (and optionally one image) and score the samples."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(..., min_length=1, max_length=200, description="stage name whose checkpoint/ to load (GET /api/checkpoints)")
    prompt: str = Field(..., min_length=1, max_length=100_000)
    image_b64: str | None = Field(None, description="PNG/JPEG bytes, base64 (a data: URL prefix is accepted)")
    answer: str | None = Field(None, max_length=10_000, description="reference answer, for the accuracy components")
    task: str = Field("chat", min_length=1, max_length=100, description="routes the reward components")
    difficulty: int = Field(1, ge=1, le=5)
    n: int = Field(4, ge=1, le=1024, description="samples (capped by the server's max_samples)")
    max_new_tokens: int = Field(64, ge=1, le=100_000, description="capped by the server's max_new_tokens")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy; otherwise at least 0.01")
    top_p: float = Field(1.0, ge=1e-6, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


    @field_validator("temperature")
    @classmethod
    def _greedy_or_sane(cls, v: float) -> float:
        # The engine divides float32 logits by it: a tiny positive temperature overflows them.
        if 0.0 < v < 0.01:
            raise ValueError(f"temperature {v}: use 0 for greedy decoding, or at least 0.01")
        return v


class LiveSample(BaseModel):
    index: int
    text: str
    tokens: int
    finish_reason: str
    total: float
    components: dict[str, float | None]
    contributions: dict[str, float]
    failures: dict[str, str]
    correct: bool | None


class LiveResponse(BaseModel):
    checkpoint: str
    policy_version: int = Field(description="the engine's count of weight updates since it loaded the checkpoint: 0 here, not the step it was trained to")
    reward_source: str = Field(description="'recipe' (the run's rewards config) or 'default' (built-in task-routed stack)")
    components: list[str]
    seconds_generate: float
    seconds_score: float
    samples: list[LiveSample]

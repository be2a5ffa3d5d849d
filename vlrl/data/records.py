"""The dataset record: one chat sample with its images, answer and routing fields.

Every stage reads records through this model, so a dataset made by
`vlrl data make`, a user's JSONL/Parquet file and the rollout store agree on
field names. Image placeholders in `messages` are `{"type": "image"}` content
items; the n-th placeholder refers to `images[n]`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Family = Literal["perception", "reasoning", "text"]


class ContentItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image"]
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentItem]

    def parts(self) -> list[ContentItem]:
        if isinstance(self.content, str):
            return [ContentItem(type="text", text=self.content)]
        return self.content

    def n_images(self) -> int:
        return sum(1 for p in self.parts() if p.type == "image")


class Record(BaseModel):
    """One sample. `messages` ends with the assistant turn for training data;
    prompts for eval/RL are `messages` without a trailing assistant turn."""

    model_config = ConfigDict(extra="forbid")

    id: str
    messages: list[Message]  # chat; image placeholders as {"type": "image"}
    images: list[str | bytes] = Field(default_factory=list)  # paths (relative to the data file) or PNG/JPEG bytes
    answer: str | None = None  # reference final answer (what goes in \boxed{})
    task: str = "chat"  # e.g. read_digits, arith; routes rewards and eval grouping
    family: Family = "text"  # perception | reasoning | text
    difficulty: int = Field(default=1, ge=1, le=5)
    rewards: list[str] | None = None  # reward components for this record; None = route by task
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("messages must hold at least one message")
        return v

    @model_validator(mode="after")
    def _images_match_placeholders(self) -> "Record":
        n = sum(m.n_images() for m in self.messages)
        if n != len(self.images):
            raise ValueError(f"messages have {n} image placeholder(s) but images has {len(self.images)} entr(y/ies)")
        return self

    def prompt_messages(self) -> list[Message]:
        """The conversation up to (not including) a trailing assistant turn."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages[:-1]
        return list(self.messages)

    def target_text(self) -> str | None:
        """The trailing assistant turn's text, if the record has one."""
        if self.messages and self.messages[-1].role == "assistant":
            return "".join(p.text or "" for p in self.messages[-1].parts() if p.type == "text")
        return None

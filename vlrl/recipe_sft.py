"""Configs of the SFT and merge stages (kept apart from vlrl/recipe.py: one stage kind per module)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from vlrl.recipe_base import _StageBase


class _PlannedStage(_StageBase):
    """Stage kinds the schema knows but this version cannot run yet."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    from_: str | None = Field(None, alias="from")
    data: str | None = None


class SftStage(_PlannedStage):
    kind: Literal["sft"] = "sft"


class MergeStage(_PlannedStage):
    kind: Literal["merge"] = "merge"

"""Config of the RL stage (kept apart from vlrl/recipe.py: one stage kind per module)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from vlrl.recipe_base import _StageBase


class RlStage(_StageBase):
    """Planned: validates loosely until the RL stage lands."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    kind: Literal["rl"] = "rl"
    from_: str | None = Field(None, alias="from")
    data: str | None = None

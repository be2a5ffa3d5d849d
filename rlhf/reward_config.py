"""The RL stage's `rewards` section, checked without importing the trainer.

Kept out of rlhf/stage.py (which imports torch) so that `vlrl validate` and `vlrl run` can
check it before anything runs: the kernel's recipe schema passes the section through as a
mapping, because its schema belongs to `rewards/`, and a typo there used to surface only
when the RL stage started, after every stage before it.
"""

from __future__ import annotations

from pydantic import ValidationError

from vlrl.errors import RecipeError
from vlrl.recipe_rl import RlStage


def _one_line(e: ValidationError, where: str) -> str:
    """`where.rewards.<key path>: what was expected`, as the recipe's own errors read."""
    errs = e.errors()
    err = errs[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err.get("input"), dict | list) and loc else ""
    more = f" [+{len(errs) - 1} more error(s)]" if len(errs) > 1 else ""
    return f"{where}.rewards{'.' + loc if loc else ''}: {msg}{got}{more}"


def validate_rewards(cfg: RlStage, where: str):
    """The stage's reward stack config (its `rewards` plus `reward_terms`), or a RecipeError."""
    from rewards.stack import ComponentConfig, RewardStackConfig

    try:
        stack = RewardStackConfig.model_validate(cfg.rewards)
    except ValidationError as e:
        raise RecipeError(_one_line(e, where)) from None
    if not cfg.reward_terms:
        return stack
    clash = sorted(set(cfg.reward_terms) & set(stack.components))
    if clash:
        raise RecipeError(f"{where}.reward_terms: {clash} already named in rewards.components; rename the term")
    # Added on top of the stack as given (its default routing kept): a copy, not a re-validation,
    # which would read `components` as user-set and drop the default routes.
    terms = {name: ComponentConfig(fn=t.fn or name, weight=t.weight, args=t.args) for name, t in cfg.reward_terms.items()}
    return stack.model_copy(update={"components": {**stack.components, **terms}, "always": [*stack.always, *terms]})

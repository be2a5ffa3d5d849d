"""The RL stage's reward section, checked without torch or Ray: by the stage as it starts,
and by `vlrl validate` / `vlrl run` before any stage starts (`vlrl.recipe.STAGE_CHECKS`)."""

from __future__ import annotations

from vlrl.errors import RecipeError
from vlrl.recipe_rl import RlStage


def validate_rewards(cfg: RlStage, where: str):
    """The rewards section, checked before anything is loaded."""
    from rewards.stack import ComponentConfig, RewardStackConfig

    stack = RewardStackConfig.parse(cfg.rewards, f"{where}.rewards")
    if not cfg.reward_terms:
        return stack
    clash = sorted(set(cfg.reward_terms) & set(stack.components))
    if clash:
        raise RecipeError(f"{where}.reward_terms: {clash} already named in rewards.components; rename the term")
    # Added on top of the stack as given (its default routing kept): a copy, not a re-validation,
    # which would read `components` as user-set and drop the default routes.
    terms = {name: ComponentConfig(fn=t.fn or name, weight=t.weight, args=t.args) for name, t in cfg.reward_terms.items()}
    return stack.model_copy(update={"components": {**stack.components, **terms}, "always": [*stack.always, *terms]})


def check_stage(cfg: RlStage, where: str) -> list[str]:
    """The rewards section and every plugin it names (imported, signature and options
    checked, nothing called); one line naming the components and their plugins."""
    stack = validate_rewards(cfg, where)
    try:
        stack.check_plugins()
    except RecipeError as e:
        msg = str(e)
        for term in cfg.reward_terms:  # merged into the components above: name the key the user wrote
            if msg.startswith(f"rewards.components.{term}: "):
                msg = f"reward_terms.{term}: " + msg.split(": ", 1)[1]
        raise RecipeError(f"{where}.{msg}") from None
    names = ", ".join(n if c.fn == n else f"{n} ({c.fn})" for n, c in stack.components.items())
    return [f"{where} rewards: {names}"]

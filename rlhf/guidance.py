"""Off-policy guidance: the record's reference solution as one more member of a group.

GRPO learns nothing from a group whose samples all get the same reward, and on prompts
beyond the policy that is every group: the SFT checkpoint of the tiny recipe samples no
right answer at difficulty 3-5 (pass@16 of a few percent). LUFFY (Yan et al. 2025,
"Learning to Reason under Off-Policy Guidance") mixes expert solutions into the group so
that such prompts carry a signal: the reference, scored like any sample, gets a positive
advantage against the wrong samples and a negative one drags them down.

The reference enters the loss with the trainer's own logprobs as its "old" ones (ratio 1
on the first pass): on one mini-batch its gradient is the advantage times the gradient of
its log-likelihood, an advantage-weighted SFT term. `shaping` replaces that with LUFFY's
shaping function (rlhf/losses.py, `shaped_guide_loss`). It was not sampled, so it carries no
sampling logprobs (NaN in the batch: the mismatch metrics skip it, and guidance refuses
the mismatch correction, vlrl/rl_config.py).
"""

from __future__ import annotations

from typing import Any, Sequence

from rollout.engine import Completion
from vlrl.model import stops


def needs_guidance(results: Sequence[Any], when: str) -> bool:
    """Whether a group gets the reference: `all_wrong` when no sample is right (None
    counts as not right: a verifier that could not decide gave no signal either)."""
    if when == "always":
        return True
    return not any(bool(r.correct) for r in results)


def reference_completion(
    reference: str,
    *,
    tokenizer,
    stop_id: int,
    request_id: str,
    sample_index: int,
    prompt_tokens: int,
    policy_version: int,
) -> Completion:
    """The reference text as the policy would have written it: the assistant turn's tokens
    as the chat template lays them out after the generation prompt, ended by the
    end-of-turn token a sample stops at."""
    ids = list(tokenizer(reference, add_special_tokens=False)["input_ids"]) + [int(stop_id)]
    return Completion(
        request_id=request_id,
        sample_index=sample_index,
        token_ids=ids,
        text=reference,
        logprobs=None,
        finish_reason="stop",
        stop_reason=int(stop_id),
        prompt_tokens=prompt_tokens,
        policy_version=policy_version,
    )


def end_of_turn_id(processor) -> int:
    """The token a reference solution ends with, as a sample stopping at it would."""
    got = stops.end_of_turn_id(processor)
    if got is None:
        raise ValueError("algo.guidance: the tokenizer has neither <|im_end|> nor an eos token to end a reference solution with")
    return int(got)

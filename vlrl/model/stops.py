"""Which token ids end a generated answer.

Shared by greedy eval and the rollout engines so both stop at the same place: a chat
model ends its turn with `<|im_end|>` even when its generation config only names the
base model's eos.
"""

from __future__ import annotations


def stop_token_ids(model, processor) -> tuple[int, ...]:
    """The generation config's end tokens, the tokenizer's eos and the chat end-of-turn token."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return tuple(sorted(ids))

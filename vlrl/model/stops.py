"""Which token ids end a generated answer.

Shared by greedy eval and the rollout engines so both stop at the same place: a chat
model ends its turn with `<|im_end|>` even when its generation config only names the
base model's eos.
"""

from __future__ import annotations


def _im_end(tok) -> int | None:
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    return im_end if isinstance(im_end, int) and im_end != tok.unk_token_id else None


def stop_token_ids(model, processor) -> tuple[int, ...]:
    """The generation config's end tokens, the tokenizer's eos and the chat end-of-turn token."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    tok = processor.tokenizer
    ids |= {i for i in (_im_end(tok), tok.eos_token_id) if i is not None}
    return tuple(sorted(ids))


def end_of_turn_id(processor) -> int | None:
    """The one token a written response ends with (one of `stop_token_ids`): `<|im_end|>`
    when the tokenizer has it, else its eos; None when it has neither."""
    tok = processor.tokenizer
    im_end = _im_end(tok)
    return im_end if im_end is not None else tok.eos_token_id

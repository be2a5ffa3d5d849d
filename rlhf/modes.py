"""Short/long reasoning modes (MiniCPM-V 4.5): each prompt of a step gets one mode, picked
at random; the mode appends its suffix ("Answer briefly." / "Think step by step.") to the
last user message and caps the response at its own `max_tokens`.

The pick for prompt number c of the stage is a pure function of (seed, c), like the
curriculum's draw, so resume replays the same modes. All G samples of a group share the
mode (GRPO compares samples of one prompt, and the suffix is part of the prompt).

Where we depart from MiniCPM-V 4.5: their modes are trained jointly with separate data
mixtures and a fixed ratio; here the ratio is `weight` per mode and both modes use the
same prompts and rewards (add `conciseness` to the reward stack to pay for brevity).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rollout.engine import GenerationRequest
from vlrl.data.records import ContentItem, Message

_MODE_STREAM = 7_919  # separates the mode draw from the curriculum's (seed, c) stream


def pick_mode(seed: int, cursor: int, weights: Sequence[float]) -> int:
    """Index of the mode of prompt number `cursor` (probability proportional to `weights`)."""
    w = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng([seed, _MODE_STREAM, cursor])
    return int(rng.choice(len(w), p=w / w.sum()))


def with_suffix(request: GenerationRequest, suffix: str) -> GenerationRequest:
    """The request with `suffix` appended (after a space) to the text of its last user message;
    images and their placeholders stay where they are."""
    msgs = list(request.messages)
    for k in range(len(msgs) - 1, -1, -1):
        if msgs[k].role == "user":
            parts = list(msgs[k].parts())
            if parts and parts[-1].type == "text":
                parts[-1] = ContentItem(type="text", text=f"{parts[-1].text or ''} {suffix}".lstrip())
            else:
                parts.append(ContentItem(type="text", text=suffix))
            msgs[k] = Message(role="user", content=parts)
            break
    else:
        msgs.append(Message(role="user", content=suffix))
    return request.model_copy(update={"messages": tuple(msgs)})


def mode_metrics(names: Sequence[str], modes: Sequence[str | None], lengths: Sequence[int], correct: Sequence[bool | None], stopped: Sequence[bool]) -> dict[str, float]:
    """Per mode, over its samples: share of samples, mean length, accuracy (where known), share stopped before the cap."""
    m: dict[str, float] = {}
    total = len(modes)
    for name in names:
        idx = [i for i, x in enumerate(modes) if x == name]
        m[f"mode/{name}/frac"] = len(idx) / total if total else 0.0
        if not idx:
            continue
        m[f"mode/{name}/length_mean"] = float(np.mean([lengths[i] for i in idx]))
        m[f"mode/{name}/stop_frac"] = float(np.mean([stopped[i] for i in idx]))
        known = [bool(correct[i]) for i in idx if correct[i] is not None]
        if known:
            m[f"mode/{name}/acc"] = float(np.mean(known))
    return m

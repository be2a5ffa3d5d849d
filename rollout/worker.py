"""The rollout worker: one engine (any kind, built by `make_engine`) behind a small API
that the RL controller calls, in-process or as a Ray actor (rlhf/placement.py wraps it).

The worker does nothing an engine does not already do; it exists so that what crosses
a process boundary is small and plain: requests and completions (pydantic models,
pickled), weights as numpy arrays from Ray's shared-memory store (rollout.weight_sync),
and a dict of timings. A restarted worker (Ray re-runs __init__ after a crash) comes back
holding `version` (the weights it was built from); the controller sees the older
version and re-sends the current weights before retrying the step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rollout.engine import Completion, GenerationRequest, RolloutEngine, SamplingParams, make_engine
from rollout.weight_sync import unpack


class RolloutWorker:
    def __init__(
        self,
        kind: str,
        model_path: str,
        *,
        device: str = "cpu",
        version: int = 0,
        threads: int | None = None,
        options: Mapping[str, Any] | None = None,
        engine: RolloutEngine | None = None,
    ) -> None:
        """`engine` takes an already built engine (in-process use); otherwise one is
        built from `model_path`. `threads` sets torch's intra-op threads in this process."""
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.engine = engine if engine is not None else make_engine(kind, model_path, device, version=version, **dict(options or {}))

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, min_version: int | None = None
    ) -> tuple[list[list[Completion]], dict[str, float]]:
        """-> (completions per request, {"seconds", "tokens", "version"})."""
        t = time.perf_counter()
        out = self.engine.generate(requests, params, min_version=min_version)
        tokens = sum(len(c.token_ids) for g in out for c in g)
        return out, {"seconds": time.perf_counter() - t, "tokens": float(tokens), "version": float(self.engine.version)}

    def update_weights(self, packed: Mapping, version: int) -> int:
        """Load packed weights (rollout.weight_sync.pack) -> the version now held."""
        self.engine.update_weights(unpack(packed), version)
        return self.engine.version

    def update_tensors(self, named, version: int) -> int:
        """In-process variant: tensors straight from the trainer (the engine copies them)."""
        self.engine.update_weights(named, version)
        return self.engine.version

    def version(self) -> int:
        return self.engine.version

    def pid(self) -> int:
        return os.getpid()

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()

"""The rollout engine contract: what the RL trainer asks of any generation backend.

The trainer only sees this module. A transformers engine (`rollout.hf_engine`, any
device, the CPU path every test runs) and a vLLM engine (CUDA / Ascend, issue 7) sit
behind the same five calls, so swapping one for the other is a recipe key, not a code
change:

- `generate(requests, params)` -> one list of `Completion`s per request, n per request.
- `update_weights(named_tensors, version)` -> in-place load of the trainer's new weights.
- `version` -> the policy version the engine holds; every completion is stamped with the
  version that produced it, and `generate(..., min_version=v)` refuses to run on older
  weights. Staleness is therefore always the caller's explicit choice: an on-policy step
  passes its own version, an asynchronous one passes `step - max_staleness`.
- `sleep(level)` / `wake()` -> give the device memory back between rollouts when the
  trainer shares the device (`colocate` placement).
- `close()`.

Sampling logprobs (what `Completion.logprobs` holds) — the one place engines
disagree by default, so the interface fixes it and makes it a construction option:

- `"processed"` (default): log-probability of the chosen token under the distribution
  it was actually drawn from: logits / temperature, then top-k, then top-p (nucleus),
  renormalised. This is the behaviour policy's probability, which importance-sampling
  corrections between sampler and trainer need. With top_k off and top_p = 1 it is
  `log_softmax(logits / temperature)`, which is what a trainer that scales its logits
  by the rollout temperature recomputes. Greedy decoding (temperature 0) samples from a
  point mass, so every processed logprob is 0.0.
- `"raw"`: `log_softmax(logits)` of the model at temperature 1, ignoring every
  sampling transform. vLLM returns this by default (its `raw_logprobs` mode); our vLLM
  engine maps `"processed"` to vLLM's `processed_logprobs` mode.

The mode is fixed per engine (vLLM sets it when the engine starts, not per request),
and each engine reports it as `engine.logprobs_mode`.

Finish reasons: `"stop"` when a stop token id (the model's end tokens plus
`SamplingParams.stop_token_ids`) or a stop string ended the sample, `"length"` when
`max_new_tokens` did. Token ids always keep every sampled token, the stop token
included (the trainer must learn to emit it, and its logprob is there); the text drops
special tokens and is cut before a matched stop string (vLLM's default), unless
`include_stop_str_in_output`.

This module imports neither torch nor any engine, so the vLLM environment (which has
no verl) and tooling can import the contract alone; engines load lazily in `make_engine`.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlrl.data.records import Message, Record
from vlrl.errors import NotAvailableYet, VlrlError

if TYPE_CHECKING:
    import torch

LogprobsMode = Literal["raw", "processed"]
FinishReason = Literal["stop", "length"]
EngineKind = Literal["hf", "vllm"]

NamedTensors = Mapping[str, "torch.Tensor"] | Iterable[tuple[str, "torch.Tensor"]]


class StaleWeightsError(VlrlError):
    """A rollout asked for a policy version newer than the engine holds."""


class SamplingParams(BaseModel):
    """How to sample, for every request of one `generate` call (vLLM's field names
    where they exist, so the vLLM engine translates one to one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, description="samples per request (the GRPO group size)")
    # Lower bounds: a float32 sampler turns top_p below ~1e-38 into 0 and overflows
    # logits / temperature for temperatures near 0 (found by the inspector's schemathesis run).
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy (argmax); otherwise at least 0.01; top_k/top_p are ignored at 0")
    top_p: float = Field(1.0, ge=1e-6, le=1.0, description="nucleus: keep the smallest set of tokens whose mass reaches top_p; 1 = off")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off (vLLM spells off as -1 or 0)")
    max_new_tokens: int = Field(256, ge=1, description="hard cap on generated tokens; hitting it gives finish_reason 'length'")
    stop: tuple[str, ...] = Field((), description="stop strings: generation ends once the decoded text contains one")
    stop_token_ids: tuple[int, ...] = Field((), description="token ids that end a sample, in addition to the model's end tokens")
    include_stop_str_in_output: bool = Field(False, description="keep the matched stop string at the end of the text")
    seed: int | None = Field(None, description="same requests, params, weights and seed -> same completions; None draws a fresh seed")
    logprobs: bool = Field(True, description="return per-token sampling logprobs (see the module docstring for which)")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty (an empty string would stop every sample at once)")
        return v

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sane(cls, v: float) -> float:
        if 0.0 < v < 0.01:
            raise ValueError("temperature must be 0 (greedy) or at least 0.01")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationRequest(BaseModel):
    """One prompt: a chat without its trailing assistant turn, the images its
    `{"type": "image"}` placeholders refer to (in order), and an id that comes back
    on every completion. It has the `record` / `images` pair that
    `vlrl.model.batching` collates, so engines reuse the training prompt layout."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    request_id: str
    messages: tuple[Message, ...]
    images: tuple[Image.Image, ...] = ()  # RGB, one per placeholder

    @model_validator(mode="after")
    def _is_a_prompt(self) -> "GenerationRequest":
        if not self.messages:
            raise ValueError(f"request {self.request_id}: messages must hold at least one message")
        if self.messages[-1].role == "assistant":
            raise ValueError(
                f"request {self.request_id}: the last message is an assistant turn; prompts end before the answer "
                "(build requests with GenerationRequest.from_record, which drops it)"
            )
        n = sum(m.n_images() for m in self.messages)
        if n != len(self.images):
            raise ValueError(f"request {self.request_id}: messages have {n} image placeholder(s) but {len(self.images)} image(s) were given")
        return self

    @classmethod
    def from_record(cls, record: Record, images: Sequence[Image.Image], request_id: str | None = None) -> "GenerationRequest":
        """The record's prompt (its trailing assistant turn, if any, dropped); the
        request id defaults to the record id."""
        prompt = record.prompt_messages()
        n = sum(m.n_images() for m in prompt)
        # A training record's images may include ones that only its answer shows; the
        # prompt keeps the first n, which are the ones its placeholders refer to.
        return cls(request_id=record.id if request_id is None else request_id, messages=tuple(prompt), images=tuple(images[:n]))

    @classmethod
    def from_sample(cls, sample: Any, request_id: str | None = None) -> "GenerationRequest":
        """From a `vlrl.data.images.Sample` (or anything with `.record` and `.images`)."""
        return cls.from_record(sample.record, sample.images, request_id)

    @property
    def record(self) -> Record:
        """A prompt-only record (no answer, no image references), for collating."""
        # The images travel in memory, so the record has no paths: construct it without
        # the validator that ties `images` to the placeholders (checked above instead).
        # Every defaulted-by-factory field is given, because pydantic inspects factories
        # on each construct (~0.4 ms a record, measured).
        return Record.model_construct(id=self.request_id, messages=list(self.messages), images=[], meta={})


class Completion(BaseModel):
    """One sampled response. Lists are per generated token, stop token included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    sample_index: int  # 0..n-1 within its request
    token_ids: list[int]  # (L,) generated tokens
    text: str  # decoded without special tokens, cut before a matched stop string
    logprobs: list[float] | None  # (L,) sampling logprobs (engine.logprobs_mode), None unless asked for
    finish_reason: FinishReason
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for 'length'
    prompt_tokens: int  # prompt length in tokens, image tokens included, padding excluded
    policy_version: int  # the weights version that generated every token of this sample

    @model_validator(mode="after")
    def _aligned(self) -> "Completion":
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")
        return self


class RolloutEngine(ABC):
    """Base of every engine. Public methods enforce the contract (awake, fresh enough
    weights, unique request ids, monotone versions); subclasses implement the
    underscored hooks."""

    kind: ClassVar[str]

    def __init__(self, *, logprobs_mode: LogprobsMode = "processed", version: int = 0) -> None:
        if logprobs_mode not in ("raw", "processed"):
            raise VlrlError(f"logprobs_mode {logprobs_mode!r}: expected 'raw' or 'processed'")
        self._logprobs_mode: LogprobsMode = logprobs_mode
        self._version = int(version)
        self._asleep = False
        self._weights_dropped = False  # sleep(level=2) may discard weights: update_weights before generating again
        self._closed = False

    # -- properties -------------------------------------------------------
    @property
    def version(self) -> int:
        """Policy version of the weights the engine holds (the trainer's step that made them)."""
        return self._version

    @property
    def logprobs_mode(self) -> LogprobsMode:
        return self._logprobs_mode

    @property
    def asleep(self) -> bool:
        return self._asleep

    # -- the contract -----------------------------------------------------
    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, *, min_version: int | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions for each request, in request order; completion j
        of request i is `result[i][j]` with `sample_index == j`.

        `min_version`: refuse (StaleWeightsError) if the engine holds older weights.
        """
        self._check_usable()
        if min_version is not None and self._version < min_version:
            raise StaleWeightsError(
                f"{self.kind} engine holds policy version {self._version} but this rollout requires >= {min_version}: "
                "call update_weights with the trainer's weights first (or lower min_version to allow stale rollouts)"
            )
        if not requests:
            return []
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"request ids must be unique within one generate call; repeated: {dup[:5]}")
        return self._generate(list(requests), params)

    def update_weights(self, weights: NamedTensors, version: int) -> None:
        """Load the trainer's tensors (names as in the policy's `state_dict()`; a subset is
        fine, e.g. only the language model when the vision tower is frozen) in place and
        move to `version`, which must be newer than the current one."""
        if self._closed:
            raise VlrlError(f"{self.kind} engine is closed")
        if version <= self._version:
            raise ValueError(f"policy version must increase: engine holds {self._version}, update brings {version}")
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        self._load_weights(items)
        self._version = int(version)
        self._weights_dropped = False

    def sleep(self, level: int = 1) -> None:
        """Free device memory while the trainer uses the device. level 1: weights kept
        (offloaded), cache dropped; level 2: weights may be discarded too, so the next
        `generate` needs an `update_weights` first (enforced for every engine)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self._check_open()
        if self._asleep:
            return
        self._sleep(level)
        self._asleep = True
        self._weights_dropped = level == 2

    def wake(self) -> None:
        self._check_open()
        if not self._asleep:
            return
        self._wake()
        self._asleep = False

    def close(self) -> None:
        if not self._closed:
            self._close()
            self._closed = True

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks -----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise VlrlError(f"{self.kind} engine is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._asleep:
            raise VlrlError(f"{self.kind} engine is asleep: call wake() before generate()")
        if self._weights_dropped:
            raise VlrlError(f"{self.kind} engine slept at level 2 and may have dropped its weights: call update_weights() before generate()")

    # -- hooks ------------------------------------------------------------
    @abstractmethod
    def _generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[list[Completion]]: ...

    @abstractmethod
    def _load_weights(self, items: list[tuple[str, "torch.Tensor"]]) -> None:
        """Copy tensors in; validate every name and shape before changing anything."""

    @abstractmethod
    def _sleep(self, level: int) -> None: ...

    @abstractmethod
    def _wake(self) -> None: ...

    def _close(self) -> None:
        """Release the model (default: nothing beyond dropping references)."""


# kind -> "module:Class", imported only when asked for (vllm must not be imported on CPU,
# and transformers need not be imported by the vLLM environment's contract tests).
ENGINES: dict[str, str] = {"hf": "rollout.hf_engine:HFEngine", "vllm": "rollout.vllm_engine:VLLMEngine"}
_PLANNED: dict[str, str] = {}


def engine_class(kind: str) -> type[RolloutEngine]:
    """The engine class of `kind`, imported now; a clear error for unknown or planned kinds
    (so a caller can fail before starting workers that would build it)."""
    if kind in _PLANNED and kind not in ENGINES:
        raise NotAvailableYet(f"rollout engine {kind!r} is not available yet ({_PLANNED[kind]}); use engine 'hf' for now")
    spec = importlib.util.find_spec("vllm") if kind == "vllm" else None
    if kind == "vllm" and (spec is None or spec.origin is None):  # origin None: a stray namespace folder named vllm
        raise NotAvailableYet(
            "rollout engine 'vllm' is not available yet in this environment: the vllm package is not installed "
            "(pip install -e '.[gpu]' on CUDA, '.[npu]' on Ascend; docs/backends.md); use engine 'hf'"
        )
    if kind not in ENGINES:
        raise VlrlError(f"unknown rollout engine {kind!r}: expected one of {', '.join(sorted(set(ENGINES) | set(_PLANNED)))}")
    module, cls_name = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), cls_name)


def make_engine(kind: str, model_path: str, device: str = "auto", **opts: Any) -> RolloutEngine:
    """Build an engine by kind from a local checkpoint directory; `opts` go to the
    engine's constructor (e.g. `logprobs_mode`, `dtype`, `max_batch_rows` for hf)."""
    return engine_class(kind).from_pretrained(model_path, device=device, **opts)


class TextGenerator:
    """Any rollout engine as `generate(prompts: list[str], **sampling) -> list[str]`.

    Text-only callers (the generative judge in `rewards/models.py`, scripts) need one
    string back per prompt string; this wraps each prompt as a one-turn user chat and
    maps vLLM/OpenAI-style keywords (`max_tokens`) onto `SamplingParams`, so the judge
    runs on the same engine (and the same loaded weights) as the rollouts.
    """

    _ALIASES = {"max_tokens": "max_new_tokens"}

    def __init__(self, engine: "RolloutEngine"):
        self.engine = engine

    def generate(self, prompts: Sequence[str], **sampling: Any) -> list[str]:
        kw = {self._ALIASES.get(k, k): v for k, v in sampling.items()}
        params = SamplingParams(**{**kw, "n": 1})
        requests = [
            GenerationRequest(request_id=f"text-{i}", messages=(Message(role="user", content=p),)) for i, p in enumerate(prompts)
        ]
        return [group[0].text for group in self.engine.generate(requests, params)]

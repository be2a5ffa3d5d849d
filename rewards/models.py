"""Model rewards, behind the same plugin API as the rules.

- `hf_reward_model`: a Hugging Face sequence-classification reward model from a local
  path, loaded once in a Ray actor (or in-process with actor=false), scored in batches.
- `judge`: a generative judge on the rollout engine (any object, or Ray actor handle,
  with `generate(prompts: list[str], **sampling) -> list[str]`): fill a prompt template,
  generate, parse a score out of whatever the judge wrote.
- `openai_judge`: the same judging through an OpenAI-compatible `/v1/chat/completions`
  endpoint (a vLLM server, say), with request timeouts, retries with backoff and a
  concurrency limit.

All three run in-process (not in the pool): the work happens in an actor or a server,
and what stays here is waiting. Scores come back in [0, 1] for the judges (the
template's scale mapped onto it) and as the model's logit for the reward model
(`normalize: sigmoid` maps it to (0, 1)). Torch, transformers, Ray and httpx are
imported on first use, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import random
import re
import string
from pathlib import Path
from typing import Any, Sequence

from rewards.api import RewardError, RewardSample, _content_text, reward

# --------------------------------------------------------------------------------------
# Prompt templates and score parsing (shared by both judges)

DEFAULT_JUDGE_TEMPLATE = (
    "You are grading a response to a question.\n"
    "Question: {question}\n"
    "Reference answer: {answer}\n"
    "Response: {response}\n"
    "How correct and helpful is the response? Think briefly, then end with a line "
    '"Score: N" where N is an integer from 0 to 10.'
)
_TEMPLATE_FIELDS = {"question", "response", "answer", "task", "final_answer"}


def check_template(template: str) -> None:
    """Fail early on a template that names a field we do not fill (literal braces: {{ }})."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"judge template does not parse: {e} (write literal braces as {{{{ and }}}})") from None
    unknown = {n.split(".")[0].split("[")[0] for n in names} - _TEMPLATE_FIELDS
    if unknown:
        raise ValueError(f"judge template uses unknown field(s) {sorted(unknown)}; available: {sorted(_TEMPLATE_FIELDS)}")


def final_answer(response: str) -> str:
    """The part after the reasoning: text after the last </think> (MiniCPM-V 4.5 scores only this)."""
    return response.rsplit("</think>", 1)[-1].strip()


def render(template: str, sample: RewardSample, *, answer_only: bool = False) -> str:
    resp = final_answer(sample.response) if answer_only else sample.response
    return template.format(
        question=sample.question,
        response=resp,
        answer="" if sample.answer is None else sample.answer,
        task=sample.task,
        final_answer=final_answer(sample.response),
    )


_NUM = r"[-+]?\d+(?:\.\d+)?"
_SCORE_PATTERNS = [
    re.compile(rf"(?i)\b(?:score|rating|grade)\s*(?:is|of)?\s*[:=]?\s*\**\s*({_NUM})(?:\s*(?:/|out of)\s*({_NUM}))?"),
    re.compile(rf"\[\[\s*({_NUM})\s*\]\]"),
    re.compile(rf"\\boxed\{{\s*({_NUM})\s*\}}"),
    re.compile(rf"(?<![\w.])({_NUM})\s*/\s*({_NUM})(?![\w.])"),
]
_VERDICT = re.compile(r"(?i)\b(yes|no|correct|incorrect|right|wrong)\b")
_VERDICT_VALUE = {"yes": 1.0, "correct": 1.0, "right": 1.0, "no": 0.0, "incorrect": 0.0, "wrong": 0.0}


def parse_score(text: str, scale: Sequence[float] = (0, 10), pattern: str | None = None) -> float | None:
    """The judge's score mapped from `scale` onto [0, 1]; None when the text holds none.

    Tries, in order: `pattern` (a regex whose first group is the score), "Score: N"
    (also "N/M", "rating", "grade"), "[[N]]", "\\boxed{N}", a bare "N/M", a text that is
    just a number, and a last yes/no/correct/incorrect verdict. The last match of the
    first kind found wins (judges restate the scale before scoring). Out-of-scale
    numbers are not scores."""
    if not isinstance(text, str) or not text.strip():
        return None
    lo, hi = float(scale[0]), float(scale[1])
    if not hi > lo:
        raise ValueError(f"score scale must be (low, high) with high > low, got {tuple(scale)}")
    text = text[-20_000:]  # a runaway generation: the score is at the end
    pats = ([re.compile(pattern)] if pattern else []) + _SCORE_PATTERNS
    for pat in pats:
        for m in reversed(list(pat.finditer(text))):
            v = _to_float(m.group(1))
            if v is None:
                continue
            denom = _to_float(m.group(2)) if m.re.groups >= 2 and m.group(2) else None
            if denom:
                if 0 <= v <= denom:
                    return v / denom
                continue
            if lo <= v <= hi:
                return (v - lo) / (hi - lo)
    bare = _to_float(text.strip().rstrip("."))
    if bare is not None and lo <= bare <= hi:
        return (bare - lo) / (hi - lo)
    verdicts = _VERDICT.findall(text)
    if verdicts:
        return _VERDICT_VALUE[verdicts[-1].lower()]
    return None


def _to_float(s: str | None) -> float | None:
    try:
        v = float(s) if s is not None else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None


# --------------------------------------------------------------------------------------
# Ray helpers


def _ray():
    import ray

    if not ray.is_initialized():  # a trainer has started Ray already; the CLI and scripts may not have
        ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    return ray


def _is_actor_method(fn: Any) -> bool:
    return hasattr(fn, "remote") and callable(fn.remote)


# --------------------------------------------------------------------------------------
# Hugging Face sequence-classification reward model


class RewardModelWorker:
    """Holds the reward model; runs in a Ray actor (or in-process). Text in, logits out."""

    def __init__(self, path: str, device: str = "auto", max_length: int = 1024, template: str = "chat"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from vlrl.device import resolve_device

        self.torch = torch
        self.device = resolve_device(device).torch_device
        self.tok = _load_tokenizer(path, AutoTokenizer)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.max_length = max_length
        self.template = template

    def render(self, prompt: list[dict], response: str) -> str:
        text_prompt = [{"role": m.get("role", "user"), "content": _content_text(m.get("content"))} for m in prompt]
        if self.template == "chat" and getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([*text_prompt, {"role": "assistant", "content": response}], tokenize=False)
        question = next((m["content"] for m in reversed(text_prompt) if m["role"] == "user"), "")
        fmt = "{question}\n{response}" if self.template in ("chat", "plain") else self.template
        return fmt.format(question=question, response=response)

    def score(self, items: list[tuple[list[dict], str]]) -> list[float]:  # (B,) logits of label 0
        texts = [self.render(p, r) for p, r in items]
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length).to(self.device)
        with self.torch.no_grad():
            logits = self.model(**enc).logits  # (B, num_labels)
        return [float(x) for x in logits[:, 0].float().cpu()]

    def ping(self) -> bool:
        return True


def _load_tokenizer(path: str, auto):
    """AutoTokenizer, except for a plain tokenizer.json saved as such: transformers 5 would rebuild
    it as the model type's tokenizer class (Qwen2's byte-level BPE rules on a word-level vocab)."""
    import json

    from transformers import PreTrainedTokenizerFast

    cfg = Path(path) / "tokenizer_config.json"
    try:
        cls = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
    except (OSError, ValueError):
        cls = None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return auto.from_pretrained(path)


@reward("hf_reward_model", kind="model", batched=True)
class HFRewardModel:
    """Score (prompt, response) with a local Hugging Face sequence-classification reward model."""

    def __init__(
        self,
        *,
        path: str,
        template: str = "chat",
        max_length: int = 1024,
        device: str = "auto",
        normalize: str = "none",
        answer_only: bool = False,
        actor: bool = True,
        num_cpus: float = 1,
        num_gpus: float | None = None,
        timeout_s: float = 300.0,
    ):
        if not Path(path).is_dir():
            raise ValueError(f"hf_reward_model: {path!r} is not a local model directory (config.json + weights)")
        if normalize not in ("none", "sigmoid"):
            raise ValueError(f"hf_reward_model: normalize is 'none' or 'sigmoid', not {normalize!r}")
        self.path, self.template, self.max_length, self.device = str(Path(path).resolve()), template, max_length, device
        self.normalize, self.answer_only, self.actor = normalize, answer_only, actor
        self.num_cpus, self.num_gpus, self.timeout_s = num_cpus, num_gpus, timeout_s
        self._backend: Any = None

    def _get_backend(self):
        if self._backend is None:
            args = (self.path, self.device, self.max_length, self.template)
            if self.actor:
                ray = _ray()
                num_gpus = self.num_gpus
                if num_gpus is None:
                    from vlrl.device import resolve_device

                    num_gpus = 1 if resolve_device(self.device).ray_resource == "GPU" else 0
                cls = ray.remote(num_cpus=self.num_cpus, num_gpus=num_gpus)(RewardModelWorker)
                self._backend = cls.remote(*args)
            else:
                self._backend = RewardModelWorker(*args)
        return self._backend

    def close(self) -> None:
        """Stop the actor (the stack calls this on close)."""
        if self._backend is not None and self.actor:
            import ray

            if ray.is_initialized():
                ray.kill(self._backend)
        self._backend = None

    def __call__(self, samples: list[RewardSample]) -> list[float]:
        items = [(s.prompt, final_answer(s.response) if self.answer_only else s.response) for s in samples]
        backend = self._get_backend()
        if self.actor:
            ray = _ray()
            try:
                scores = ray.get(backend.score.remote(items), timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                ray.kill(backend)  # a stuck actor is replaced on the next call
                self._backend = None
                raise RewardError(f"reward model gave no scores within {self.timeout_s:g}s (actor restarted)") from None
        else:
            scores = backend.score(items)
        if self.normalize == "sigmoid":
            scores = [1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x)))) for x in scores]
        return scores


# --------------------------------------------------------------------------------------
# Generative judge on the rollout engine


@reward("judge", kind="model", batched=True)
class GenerativeJudge:
    """Ask a generative model (the rollout engine) to grade each response; parse its score."""

    def __init__(
        self,
        *,
        engine: Any = None,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        sampling: dict | None = None,
        scale: tuple[float, float] = (0, 10),
        pattern: str | None = None,
        answer_only: bool = False,
        timeout_s: float = 300.0,
    ):
        check_template(template)
        if pattern is not None:
            re.compile(pattern)
        parse_score("", scale)  # validates the scale
        if engine is None:
            raise ValueError("judge: needs an engine (the stack passes the rollout engine as context['engine'], or give engine: module:factory)")
        if isinstance(engine, str):
            from rewards.registry import load_ref, PluginRef

            where, _, name = engine.rpartition(":")
            kind = "file" if where.endswith(".py") or "/" in where else "module"
            engine = load_ref(PluginRef(kind, str(Path(where).resolve()) if kind == "file" else where, name))()
        if not hasattr(engine, "generate"):
            raise ValueError(f"judge: engine {type(engine).__name__} has no generate(prompts, **sampling) method")
        self.engine, self.template, self.sampling = engine, template, dict(sampling or {"temperature": 0.0, "max_tokens": 256})
        self.scale, self.pattern, self.answer_only, self.timeout_s = tuple(scale), pattern, answer_only, timeout_s

    def __call__(self, samples: list[RewardSample]) -> list[Any]:
        prompts = [render(self.template, s, answer_only=self.answer_only) for s in samples]
        gen = self.engine.generate
        if _is_actor_method(gen):
            outs = _ray().get(gen.remote(prompts, **self.sampling), timeout=self.timeout_s)
        else:
            outs = gen(prompts, **self.sampling)
        if len(outs) != len(prompts):
            raise RewardError(f"judge engine returned {len(outs)} texts for {len(prompts)} prompts")
        return [_score_or_error(o, self.scale, self.pattern) for o in outs]


def _score_or_error(text: Any, scale, pattern) -> float | RewardError:
    v = parse_score(text if isinstance(text, str) else "", scale, pattern)
    if v is None:
        snippet = str(text)[-120:].replace("\n", " ")
        return RewardError(f"no score in judge output: {snippet!r}")
    return v


# --------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint


class _Retryable(Exception):
    pass


@reward("openai_judge", kind="model")
class OpenAIJudge:
    """Grade each response through an OpenAI-compatible /v1/chat/completions endpoint.

    Set the component's `timeout` to cover the retries (about retries x request_timeout_s)."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 256,
        scale: tuple[float, float] = (0, 10),
        pattern: str | None = None,
        answer_only: bool = False,
        send_images: bool = False,
        request_timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 8,
    ):
        check_template(template)
        parse_score("", scale)
        if retries < 0 or max_concurrency < 1 or request_timeout_s <= 0:
            raise ValueError("openai_judge: need retries >= 0, max_concurrency >= 1, request_timeout_s > 0")
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.model, self.template, self.api_key_env = model, template, api_key_env
        self.temperature, self.max_tokens, self.scale, self.pattern = temperature, max_tokens, tuple(scale), pattern
        self.answer_only, self.send_images = answer_only, send_images
        self.request_timeout_s, self.retries, self.backoff_s, self.max_concurrency = request_timeout_s, retries, backoff_s, max_concurrency
        self.stats = {"requests": 0, "retries": 0}
        self._loop: Any = None
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None

    def _session(self):
        import httpx

        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # clients and semaphores belong to one event loop
            self._loop = loop
            limits = httpx.Limits(max_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(timeout=self.request_timeout_s, limits=limits)
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._client, self._sem

    def close(self) -> None:
        """Close the HTTP client on the loop it belongs to (the stack calls this on close)."""
        client, loop, self._client, self._loop = self._client, self._loop, None, None
        if client is not None and loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)

    def _payload(self, sample: RewardSample) -> dict:
        text = render(self.template, sample, answer_only=self.answer_only)
        content: Any = text
        if self.send_images and len(sample.images):
            content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in sample.images]
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": self.temperature, "max_tokens": self.max_tokens}

    async def __call__(self, sample: RewardSample) -> float:
        import httpx

        client, sem = self._session()
        payload = self._payload(sample)
        headers = {}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last: str = ""
        async with sem:
            for attempt in range(self.retries + 1):
                if attempt:
                    self.stats["retries"] += 1
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
                self.stats["requests"] += 1
                try:
                    r = await client.post(self.url, json=payload, headers=headers)
                    if r.status_code == 429 or r.status_code >= 500:
                        raise _Retryable(f"HTTP {r.status_code}")
                    if r.status_code >= 400:
                        raise RewardError(f"endpoint refused the request: HTTP {r.status_code}: {r.text[:200]}")
                    text = r.json()["choices"][0]["message"]["content"]
                except (_Retryable, httpx.TimeoutException, httpx.TransportError) as e:
                    last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    continue
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    raise RewardError(f"endpoint reply is not a chat completion: {type(e).__name__}: {e}") from None
                v = _score_or_error(text, self.scale, self.pattern)
                if isinstance(v, RewardError):
                    raise v
                return v
        raise RewardError(f"endpoint failed {self.retries + 1} time(s); last: {last}")


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

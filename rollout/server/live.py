"""The live side: sample a run's checkpoint on a user's prompt and image, score the samples.

One engine is loaded at a time (the last checkpoint asked for; reloaded when its files
change, as an RL stage overwrites `checkpoint/`), and one generation runs at a time:
a CPU box has no room for two models, and a second caller waits, then gets 429.
The reward stack is the run's own (`rewards` of the RL stage in recipe.resolved.json),
else the built-in task-routed stack (`answer_match` by default, the same verdict as
eval), built on first use and closed with the server.

torch and transformers are imported here only, on the first live request.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from rollout.server.models import Limits, LiveRequest, LiveResponse, LiveSample
from rollout.server.rundir import RunDir
from vlrl.errors import VlrlError


class Busy(VlrlError):
    """Another live generation is still running."""


class TooLarge(VlrlError):
    """An upload or an ask over the server's limits."""


def decode_image(b64: str, max_pixels: int) -> Image.Image:
    """RGB image from base64 (a `data:...;base64,` prefix is allowed); VlrlError if it is not one."""
    if b64.startswith("data:"):
        b64 = b64.partition(",")[2]
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise VlrlError(f"image_b64: not valid base64 ({e})") from e
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if w * h > max_pixels:
            raise TooLarge(f"image_b64: {w}x{h} pixels is over the limit of {max_pixels}")
        img.load()
        return img.convert("RGB")
    except TooLarge:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise VlrlError(f"image_b64: not a readable image ({type(e).__name__}: {e})") from e


class LiveSampler:
    def __init__(self, run: RunDir, limits: Limits, device: str = "auto"):
        self.run = run
        self.limits = limits
        self.device = device
        self._lock = threading.Lock()
        self._engine = None
        self._engine_key: tuple | None = None
        self._stack = None
        self._stack_source = ""
        self._stack_stage: str | None = None

    def generate(self, req: LiveRequest) -> LiveResponse:
        self._check_limits(req)
        image = decode_image(req.image_b64, self.limits.max_image_pixels) if req.image_b64 else None
        ckpt = self.run.checkpoint(req.checkpoint)  # NoSuchStage when absent
        if not self._lock.acquire(timeout=self.limits.live_wait_s):
            raise Busy(f"another generation is running; retry in a moment (waited {self.limits.live_wait_s:.0f} s)")
        try:
            return self._generate(req, ckpt, image)
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            if self._stack is not None:
                self._stack.close()
                self._stack = None

    def _check_limits(self, req: LiveRequest) -> None:
        lim = self.limits
        if req.n > lim.max_samples:
            raise TooLarge(f"n={req.n}: at most {lim.max_samples} samples per request")
        if req.max_new_tokens > lim.max_new_tokens:
            raise TooLarge(f"max_new_tokens={req.max_new_tokens}: at most {lim.max_new_tokens}")
        if len(req.prompt) > lim.max_prompt_chars:
            raise TooLarge(f"prompt of {len(req.prompt)} characters: at most {lim.max_prompt_chars}")

    def _generate(self, req: LiveRequest, ckpt: Path, image: Image.Image | None) -> LiveResponse:
        from rewards.api import RewardSample
        from rollout.engine import GenerationRequest, SamplingParams
        from vlrl.data.records import Message

        engine = self._engine_for(ckpt)
        stack = self._stack_for(req.checkpoint)
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": req.prompt}]
        messages = [Message(role="user", content=content)]
        request = GenerationRequest(request_id="live", messages=tuple(messages), images=(image,) if image is not None else ())
        params = SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_new_tokens=req.max_new_tokens, seed=req.seed, logprobs=False)
        t0 = time.perf_counter()
        (completions,) = engine.generate([request], params)
        t1 = time.perf_counter()
        prompt = [m.model_dump(exclude_none=True) for m in messages]
        samples = [
            RewardSample(
                response=c.text,
                prompt=prompt,
                answer=req.answer,
                task=req.task,
                difficulty=req.difficulty,
                response_ids=c.token_ids,
                finish_reason=c.finish_reason,
                images=[image] if image is not None else [],
                group_id="live",
                id="live",
            )
            for c in completions
        ]
        results = stack.score(samples)
        t2 = time.perf_counter()
        out = [
            LiveSample(
                index=c.sample_index,
                text=c.text,
                tokens=len(c.token_ids),
                finish_reason=c.finish_reason,
                total=r.total,
                components=r.components,
                contributions=r.contributions,
                failures=r.failures,
                correct=r.correct,
            )
            for c, r in zip(completions, results)
        ]
        return LiveResponse(
            checkpoint=req.checkpoint,
            policy_version=engine.version,
            reward_source=self._stack_source,
            components=sorted({k for s in out for k in s.components}),
            seconds_generate=t1 - t0,
            seconds_score=t2 - t1,
            samples=out,
        )

    def _engine_for(self, ckpt: Path):
        from rollout.engine import make_engine

        files = [p for p in sorted(ckpt.iterdir()) if p.is_file()]
        key = (str(ckpt), tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))
        if self._engine is None or key != self._engine_key:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            self._engine = make_engine("hf", str(ckpt), device=self.device)
            self._engine_key = key
        return self._engine

    def _stack_for(self, stage: str):
        from rewards.stack import RewardStack

        if self._stack is None or self._stack_stage != stage:
            cfg = self.run.reward_config(stage)
            if self._stack is not None:
                self._stack.close()
            self._stack = RewardStack.from_config(cfg)  # RecipeError (a VlrlError) when the recipe's section is invalid
            self._stack_source = "recipe" if cfg else "default"
            self._stack_stage = stage
        return self._stack

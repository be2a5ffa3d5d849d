"""The tensors of one RL step: prompts + sampled responses as model inputs, and the
per-token log-probabilities of the responses under a model.

Layout: every row is [left padding | prompt | response | right padding]. Prompts are
collated once per prompt (`collate_for_generation`, left-padded, so every response
starts at the same column P) and repeated for the G samples of the group by indexing,
not by re-running the processor. Pixel patches travel with their rows (`select`), so a
micro-batch carries only its own images. The model's forward computes the 3D (mrope)
positions from the attention mask, which skips padding on both sides.

`response_logprobs` asks the model for the logits of the last R + 1 positions only
(`logits_to_keep`): position P - 1 + t predicts response token t, and the prompt's
positions never reach the LM head.

The G rows of a group share their images, so the vision tower runs once per distinct
image, not once per row (`_embed_images`; measured on the tiny model, 16 prompts x 8:
the tower was ~half of a training step). Its output is repeated into the rows'
embeddings, so gradients from the G copies add up exactly as if each row had run the
tower. Done for Qwen2-VL / Qwen2.5-VL, whose forward takes `inputs_embeds` beside
`input_ids`; Qwen3-VL injects deepstack features inside its forward, so it gets the
plain per-row forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlhf.losses import token_entropy
from rollout.engine import Completion, GenerationRequest
from vlrl.errors import VlrlError
from vlrl.model.batching import collate_for_generation, pad_id


@dataclass
class PolicyBatch:
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    mm_token_type_ids: torch.Tensor  # (B, P + R)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) float, 1 on generated tokens (stop token included)
    rollout_logprobs: torch.Tensor | None  # (B, R) the sampler's logprobs, 0 off the mask
    pixel_values: torch.Tensor | None = None  # (sum of the rows' patches, C*t*p*p)
    image_grid_thw: torch.Tensor | None = None  # (images of the rows, 3)
    row_images: list[list[int]] = field(default_factory=list)  # (B,) indices into `_grids` / `_patches`
    _grids: torch.Tensor | None = None  # (I, 3) every distinct image of the step
    _patches: list[tuple[int, int]] = field(default_factory=list)  # (I,) patch range of image i in `_pixels`
    _pixels: torch.Tensor | None = None  # (N, C*t*p*p)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def tokens(self) -> int:
        """Non-padding tokens fed to the model (for throughput)."""
        return int(self.attention_mask.sum())

    def select(self, rows: torch.Tensor | Sequence[int], *, trim: bool = False) -> "PolicyBatch":
        """The sub-batch of `rows` (a micro-batch), with only those rows' images; `trim`
        drops the padding columns no selected row uses (see `trimmed`)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        row_images = [self.row_images[i] for i in idx.tolist()] if self.row_images else []
        sub = _with_pixels(
            PolicyBatch(
                input_ids=self.input_ids[idx],
                attention_mask=self.attention_mask[idx],
                mm_token_type_ids=self.mm_token_type_ids[idx],
                response_ids=self.response_ids[idx],
                response_mask=self.response_mask[idx],
                rollout_logprobs=None if self.rollout_logprobs is None else self.rollout_logprobs[idx],
                row_images=row_images,
                _grids=self._grids,
                _patches=self._patches,
                _pixels=self._pixels,
            )
        )
        return sub.trimmed() if trim else sub

    def trimmed(self, response_side: bool = True) -> "PolicyBatch":
        """Without the leading columns every row pads, and (with `response_side`) without
        the trailing response columns no row reaches: R becomes the longest response of
        these rows. Compute goes with B x width, and rows sorted by length into
        micro-batches leave little padding (rlhf/workers.py)."""
        r_all = self.response_width
        p = self.input_ids.shape[1] - r_all
        used = self.attention_mask[:, :p].sum(0) > 0  # (P,) prompt columns some row uses
        left = int(used.nonzero()[0, 0]) if bool(used.any()) else p
        r = max(1, int(self.attention_mask[:, p:].sum(1).max())) if response_side else r_all
        if left == 0 and r == r_all:
            return self
        cut = slice(left, p + r)
        self.input_ids, self.attention_mask, self.mm_token_type_ids = self.input_ids[:, cut], self.attention_mask[:, cut], self.mm_token_type_ids[:, cut]
        self.response_ids, self.response_mask = self.response_ids[:, :r], self.response_mask[:, :r]
        if self.rollout_logprobs is not None:
            self.rollout_logprobs = self.rollout_logprobs[:, :r]
        return self

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        out = {
            "input_ids": self.input_ids.to(device),
            "attention_mask": self.attention_mask.to(device),
            "mm_token_type_ids": self.mm_token_type_ids.to(device),
        }
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values.to(device)
            out["image_grid_thw"] = self.image_grid_thw.to(device)
        return out


def _with_pixels(b: PolicyBatch) -> PolicyBatch:
    """Fill pixel_values / image_grid_thw from the rows' image lists."""
    images = [i for imgs in b.row_images for i in imgs]
    if not images or b._pixels is None:
        return b
    b.image_grid_thw = b._grids[images]
    b.pixel_values = torch.cat([b._pixels[s:e] for s, e in (b._patches[i] for i in images)])
    return b


def response_tensors(completions: Sequence[Completion], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> response ids (B, R), mask (B, R) float, sampler logprobs (B, R) or None.

    Sampler logprobs are None when no completion has them; a completion that was not
    sampled (a guidance reference, rlhf/guidance.py) among sampled ones gets NaN, which
    the mismatch metrics skip."""
    width = max(1, max(len(c.token_ids) for c in completions))
    ids = torch.full((len(completions), width), pad, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.float32)
    have_lp = any(c.logprobs is not None for c in completions)
    lp = torch.zeros((len(completions), width), dtype=torch.float32) if have_lp else None
    for i, c in enumerate(completions):
        n = len(c.token_ids)
        ids[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[i, :n] = 1.0
        if lp is not None:
            lp[i, :n] = torch.tensor(c.logprobs, dtype=torch.float32) if c.logprobs is not None else float("nan")
    return ids, mask, lp


def build_policy_batch(
    requests: Sequence[GenerationRequest],  # (P,) distinct prompts
    prompt_of: Sequence[int],  # (B,) row -> its prompt
    completions: Sequence[Completion],  # (B,) row -> its response
    processor,
) -> PolicyBatch:
    """Collate P prompts once and lay out B = sum of group sizes rows (see the module docstring)."""
    prompts = collate_for_generation(list(requests), processor)  # left-padded (P, T_p)
    pad = pad_id(processor)
    resp_ids, resp_mask, rollout_lp = response_tensors(completions, pad)
    placeholders = [i for i in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None)) if i is not None]
    bad = [c for c in completions if any(t in placeholders for t in c.token_ids)]
    if bad:  # the model's forward would read them as image slots and fail on the count
        raise VlrlError(
            f"response {bad[0].request_id}/{bad[0].sample_index} holds an image/video placeholder token, which the policy cannot be "
            "trained on; the rollout engine must never sample input-only tokens (HFEngine suppresses them)"
        )
    rows = torch.as_tensor(list(prompt_of), dtype=torch.long)
    p_ids, p_mask, p_mm = prompts["input_ids"][rows], prompts["attention_mask"][rows], prompts["mm_token_type_ids"][rows]
    batch = PolicyBatch(
        input_ids=torch.cat([p_ids, resp_ids], dim=1),
        attention_mask=torch.cat([p_mask, resp_mask.long()], dim=1),
        mm_token_type_ids=torch.cat([p_mm, torch.zeros_like(resp_ids)], dim=1),
        response_ids=resp_ids,
        response_mask=resp_mask,
        rollout_logprobs=rollout_lp,
    )
    if "pixel_values" in prompts:
        grids = prompts["image_grid_thw"]  # (I, 3), prompts' images in order
        sizes = grids.prod(-1).tolist()
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        first, per_prompt = 0, []
        for r in requests:
            per_prompt.append(list(range(first, first + len(r.images))))
            first += len(r.images)
        batch._grids, batch._pixels = grids, prompts["pixel_values"]
        batch._patches = list(zip(starts[:-1], starts[1:]))
        batch.row_images = [per_prompt[p] for p in prompt_of]
        _with_pixels(batch)
    return batch


def response_logprobs(
    model: torch.nn.Module,
    batch: PolicyBatch,
    temperature: float,
    *,
    entropy: bool = False,
    entropy_grad: bool = False,
    suppress: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (log pi(response token) (B, R), token entropy (B, R) or None), logits scaled by
    the rollout temperature and `suppress`ed ids masked, as the sampler's were. Zero off
    the response mask."""
    device = next(model.parameters()).device
    r = batch.response_width
    inputs = batch.model_inputs(device)
    if _shares_images(model, batch):
        inputs["inputs_embeds"] = _embed_images(model, batch, inputs, device)
        del inputs["pixel_values"]
    out = model(**inputs, logits_to_keep=r + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float() / temperature  # (B, R, V): position P-1+t predicts token t
    if suppress:  # a finite floor, not -inf: entropy's p * logit would be 0 * -inf = nan
        logits = logits.index_fill(-1, torch.as_tensor(list(suppress), device=device), -1e9)
    ids = batch.response_ids.to(device)
    mask = batch.response_mask.to(device)
    logp = (logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)) * mask  # (B, R)
    ent = None
    if entropy:
        ent = token_entropy(logits if entropy_grad else logits.detach()) * mask  # (B, R)
    return logp, ent


_DEDUP_MODELS = ("qwen2_vl", "qwen2_5_vl")


def _shares_images(model: torch.nn.Module, batch: PolicyBatch) -> bool:
    """Whether to run the tower once per distinct image, outside the model's forward. Not
    on an FSDP2-sharded model: its root parameters (the tower's among them) are gathered
    only inside its own forward, and a tower run before it would meet shards."""
    from torch.distributed.fsdp import FSDPModule

    if batch.pixel_values is None or model.config.model_type not in _DEDUP_MODELS or isinstance(model, FSDPModule):
        return False
    used = [i for imgs in batch.row_images for i in imgs]
    return len(set(used)) < len(used)


def _embed_images(model: torch.nn.Module, batch: PolicyBatch, inputs: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Token embeddings (B, L, D) with image features computed once per distinct image."""
    inner = model.model
    uniq = sorted({i for imgs in batch.row_images for i in imgs})
    pixels = torch.cat([batch._pixels[s:e] for s, e in (batch._patches[i] for i in uniq)]).to(device)
    feats = inner.get_image_features(pixels, batch._grids[uniq].to(device)).pooler_output  # one (tokens_i, D) per image
    by_image = dict(zip(uniq, feats))
    embeds = inner.get_input_embeddings()(inputs["input_ids"])  # (B, L, D)
    image = torch.cat([by_image[i] for imgs in batch.row_images for i in imgs]).to(embeds.dtype)  # (image tokens of the rows, D)
    mask, _ = inner.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds, image_features=image)
    return embeds.masked_scatter(mask, image)

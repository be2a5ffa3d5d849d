"""Pretrain the tiny model's vision tower on the synthetic world's scene labels.

Why: real VLMs start from a pretrained vision encoder (CLIP / SigLIP style); the tiny
model starts from a random one, and trained from random inside the language-model loss
its image tokens lost what they carried (docs/pretraining.md). So the model stage gives
the tiny tower a short supervised start: every merged image token (what the language
model reads) must say, through a linear head, what each of its 2x2 patches shows —
background, a shape of some colour and kind, or a character. The head is thrown away;
the tokens keep that information in a linear form.

Departure from CLIP-style pretraining: no contrastive text tower (the synthetic world
knows every pixel's content, so direct labels are cheaper on 2 CPU cores). Only the
synthetic world can label its scenes: real checkpoints come with their pretrained tower
and skip this.

Labels: a patch takes the label of the last-drawn item whose box holds the patch centre
(shapes by their bounding box; text per character, by the ink extent of its prefix).
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vlrl.data.synth.render import Scene, Shape, font, render
from vlrl.data.synth.tasks import FAMILY_TASKS, TASKS
from vlrl.data.synth.vocab import COLOR_NAMES, IMAGE_SIZE, SHAPES

CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase
_SHAPE0 = 1
_CHAR0 = 1 + len(COLOR_NAMES) * len(SHAPES)
N_CLASSES = _CHAR0 + len(CHARS)  # background, colour x shape, characters


def shape_class(color: str, kind: str) -> int:
    return _SHAPE0 + COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(kind)


def char_class(ch: str) -> int:
    """A character's class; 0 (background) for one outside CHARS (spaces, punctuation)."""
    return _CHAR0 + CHARS.index(ch) if ch in CHARS else 0


def _regions(scene: Scene) -> list[tuple[tuple[float, float, float, float], int]]:
    """(x1, y1, x2, y2), class of every labelled region, in drawing order."""
    out = []
    for item in scene.items:
        if isinstance(item, Shape):
            out.append((item.box, shape_class(item.color, item.kind)))
            continue
        f = font(item.size)
        ox, oy, _, ey = f.getbbox(item.text)
        x0, y0 = item.xy
        for k, ch in enumerate(item.text):
            a = f.getbbox(item.text[:k])[2] - ox if k else 0
            b = f.getbbox(item.text[: k + 1])[2] - ox
            out.append(((x0 + a, y0, x0 + b, y0 + ey - oy), char_class(ch)))
    return out


def patch_labels(scene: Scene, patch: int) -> list[int]:
    """One class per patch, in raster order (row by row) of the (S/patch)^2 grid."""
    grid = IMAGE_SIZE // patch
    regions = _regions(scene)
    labels = []
    for r in range(grid):
        for c in range(grid):
            cx, cy = c * patch + patch / 2, r * patch + patch / 2
            cls = 0
            for (x1, y1, x2, y2), k in regions:
                if x1 <= cx <= x2 and y1 <= cy <= y2:
                    cls = k  # later items are drawn on top
            labels.append(cls)
    return labels


def merge_order(labels: Sequence[int], grid: int, merge: int) -> list[list[int]]:
    """Raster patch labels -> one list per merged token, in the order Qwen-VL processors
    lay patches out (merge x merge windows contiguous, windows in raster order): (tokens, merge^2)."""
    out = []
    for br in range(grid // merge):
        for bc in range(grid // merge):
            out.append([labels[(merge * br + wr) * grid + merge * bc + wc] for wr in range(merge) for wc in range(merge)])
    return out


def scene_examples(
    seed: int, n: int, patch: int, merge: int, families: Sequence[str] = ("perception",)
) -> list[tuple[object, list[list[int]]]]:
    """n (image, labels per merged token) from the families' tasks (uniform over tasks) at
    every difficulty; a pure function of (seed, n, families)."""
    tasks = [t for f in families for t in FAMILY_TASKS[f]]
    out = []
    for i in range(n):
        rng = random.Random(f"vision-pretrain/{seed}/{i}")
        item = TASKS[rng.choice(tasks)].generate(rng, rng.randint(1, 5))
        out.append((render(item.scene), merge_order(patch_labels(item.scene, patch), IMAGE_SIZE // patch, merge)))
    return out


class _Probe(nn.Module):
    """Linear head: merged token (D) -> merge^2 patch classes."""

    def __init__(self, dim: int, per_token: int) -> None:
        super().__init__()
        self.per_token = per_token
        self.linear = nn.Linear(dim, per_token * N_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, per_token, C)
        return self.linear(tokens).view(-1, self.per_token, N_CLASSES)


def _encode(model, processor, images) -> tuple[torch.Tensor, torch.Tensor]:
    enc = processor.image_processor(images=list(images), return_tensors="pt")
    dev = next(model.parameters()).device
    return enc["pixel_values"].to(dev), enc["image_grid_thw"].to(dev)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy on patches that show something, accuracy on background patches)."""
    pred = logits.argmax(-1)
    fg = labels != 0
    fg_acc = float((pred[fg] == labels[fg]).float().mean()) if fg.any() else float("nan")
    bg_acc = float((pred[~fg] == 0).float().mean()) if (~fg).any() else float("nan")
    return fg_acc, bg_acc


def pretrain_vision(
    model,
    processor,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    pool: int = 3000,
    held_out: int = 200,
    background_weight: float = 0.1,
    families: Sequence[str] = ("perception",),
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train the vision tower (patch embedding, blocks, merger) for `steps` AdamW steps
    on scene labels; -> held-out accuracies before and after. The language model is
    untouched. Background patches (most of every image) weigh `background_weight` in the
    loss, so the tower cannot settle for "nothing here"."""
    vis = model.model.visual
    cfg = model.config.vision_config
    patch, merge = cfg.patch_size, cfg.spatial_merge_size
    dim = model.config.text_config.hidden_size
    torch.manual_seed(seed)
    probe = _Probe(dim, merge * merge).to(next(model.parameters()).device)
    train = scene_examples(seed, pool, patch, merge, families)
    test = scene_examples(seed + 1_000_003, held_out, patch, merge, families)

    def forward(batch) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, grid = _encode(model, processor, [im for im, _ in batch])
        labels = torch.tensor([tok for _, labs in batch for tok in labs], device=pixels.device)  # (N, merge^2)
        return probe(vis(pixels, grid_thw=grid).pooler_output), labels

    def evaluate() -> tuple[float, float]:
        vis.eval()
        with torch.no_grad():
            acc = _accuracy(*forward(test))
        vis.train()
        return acc

    before = evaluate()
    params = [p for p in vis.parameters()] + list(probe.parameters())
    for p in vis.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    weight = torch.ones(N_CLASSES, device=probe.linear.weight.device)
    weight[0] = background_weight
    gen = torch.Generator().manual_seed(seed)
    vis.train()
    t0 = time.perf_counter()
    loss_value = float("nan")
    for k in range(steps):
        idx = torch.randint(len(train), (batch_size,), generator=gen).tolist()
        logits, labels = forward([train[i] for i in idx])
        loss = nn.functional.cross_entropy(logits.reshape(-1, N_CLASSES), labels.reshape(-1), weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (k + 1) / 20)
        opt.step()
        loss_value = float(loss.detach())
        if log is not None and ((k + 1) % 50 == 0 or k + 1 == steps):
            log(k + 1, {"loss": loss_value, "seconds": time.perf_counter() - t0})
    after = evaluate()
    return {
        "steps": float(steps), "loss": loss_value, "seconds": time.perf_counter() - t0,
        "fg_accuracy_before": before[0], "bg_accuracy_before": before[1], "fg_accuracy": after[0], "bg_accuracy": after[1],
    }

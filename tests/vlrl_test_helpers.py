"""Small builders shared by several test files."""

from __future__ import annotations

import torch

from vlrl.model.batching import collate_for_training
from vlrl.model.tiny import build_tiny_model


def train_micro(samples, *, steps: int = 40, train_on: int = 12, seed: int = 0):
    """A micro model whose tokenizer is trained on the samples' texts, then fitted for
    `steps` full-batch steps on the first `train_on` samples: it writes boxed answers of
    varied lengths and ends them with <|im_end|> (some right), which eval and engine tests need."""
    corpus = [m.parts()[-1].text for s in samples for m in s.record.messages] * 10
    model, processor = build_tiny_model(corpus, preset="micro", seed=seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate_for_training(samples[:train_on], processor, max_length=128)
    for _ in range(steps):
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, processor

"""The tiny model can learn from images: gradients flow through the vision tower.

Eight noise images share one question and differ only in their answer, so the
only way to get the answers right is to read the image: a model that ignores it
cannot go below the entropy of the answers (about ln 8 spread over the answer
tokens), and greedy decoding could not return all eight.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from vlrl.data.images import Sample
from vlrl.data.records import Record
from vlrl.eval import evaluate
from vlrl.model.batching import collate_for_training
from vlrl.model.loading import component_of
from vlrl.model.tiny import build_tiny_model


def _samples(rng: np.random.Generator, n: int) -> tuple[list[Sample], str]:
    answers = [str(a) for a in rng.choice(np.arange(100, 1000), size=n, replace=False)]
    question = "What number is shown?"
    samples = [
        Sample(
            Record(
                id=f"o{i}",
                messages=[
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": f"\\boxed{{{a}}}"},
                ],
                images=[f"{i}.png"],
                answer=a,
                task="read_digits",
                family="perception",
            ),
            [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))],
            i + 1,
        )
        for i, a in enumerate(answers)
    ]
    return samples, question


def test_every_vision_parameter_gets_a_gradient():
    samples, question = _samples(np.random.default_rng(1), 2)
    model, processor = build_tiny_model([question, "\\boxed{123}"] * 20, preset="micro", seed=0)
    model(**collate_for_training(samples, processor, max_length=64), use_cache=False).loss.backward()
    for name, p in model.named_parameters():
        if component_of(name) != "language":
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_tiny_model_overfits_eight_images():
    samples, question = _samples(np.random.default_rng(0), 8)
    corpus = [question] + [f"\\boxed{{{n}}}" for n in range(1000)]
    torch.manual_seed(0)
    model, processor = build_tiny_model(corpus, preset="tiny", seed=0)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collate_for_training(samples, processor, max_length=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())

    assert losses[0] > 3.0 and losses[-1] < 0.1, (losses[0], losses[-1])
    for part in ("vision", "projector"):
        moved = max((p - before[n]).abs().max().item() for n, p in model.named_parameters() if component_of(n) == part)
        assert moved > 1e-3, part
    report = evaluate((model, processor), samples, max_new_tokens=10)
    assert report.accuracy == 1.0, [p.response for p in report.predictions]

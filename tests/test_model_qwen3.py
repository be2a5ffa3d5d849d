"""The loader, component naming and batching also hold for the Qwen3-VL family
(patch 16, deepstack mergers, interleaved mrope), checked on a small random
Qwen3-VL saved locally — vlrl never downloads a real one in tests."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlrl.data.images import Sample
from vlrl.data.records import Record
from vlrl.model.batching import IGNORE_INDEX, collate_for_generation, collate_for_training
from vlrl.model.loading import component_of, count_parameters, load_model, load_processor, set_trainable

from vlrl_test_helpers import build_tiny_qwen3


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    model, processor = build_tiny_qwen3(["What number is shown?", "\\boxed{482}", "7 + 5 = 12."] * 30, vision_depth=2, longest_edge=128)
    out = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _samples():
    rng = np.random.default_rng(0)
    img = lambda: Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))  # noqa: E731
    out = []
    for i, n_img in enumerate([1, 0, 2]):
        content = [{"type": "image"}] * n_img + [{"type": "text", "text": "What number is shown?" + " Think." * i}]
        rec = Record(id=f"q{i}", messages=[{"role": "user", "content": content}, {"role": "assistant", "content": "\\boxed{482}"}],
                     images=[f"{k}.png" for k in range(n_img)])
        out.append(Sample(rec, [img() for _ in range(n_img)], i + 1))
    return out


def test_qwen3_components_and_freezing(qwen3_dir):
    model = load_model(qwen3_dir)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    names = [n for n, _ in model.named_parameters()]
    assert any("deepstack_merger_list" in n and component_of(n) == "projector" for n in names)
    counts = count_parameters(model)
    assert min(counts["vision"], counts["projector"], counts["language"]) > 0
    counts = set_trainable(model, {"vision", "projector"})
    assert counts["trainable"] == counts["vision"] + counts["projector"]


def test_qwen3_batches_are_padding_invariant(qwen3_dir):
    model, processor = load_model(qwen3_dir, trainable=False), load_processor(qwen3_dir)
    samples = _samples()
    batch = collate_for_training(samples, processor, max_length=256)
    for row, s in enumerate(samples):
        kept = [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]
        assert processor.tokenizer.decode(kept) == "\\boxed{482}<|im_end|>"
    with torch.no_grad():
        train_logits = model(**batch).logits
        gen = collate_for_generation(samples, processor)
        gen_logits = model(**gen).logits
        for row, s in enumerate(samples):
            alone = model(**collate_for_training([s], processor, max_length=256)).logits[0]
            assert torch.allclose(train_logits[row, : alone.shape[0]], alone, atol=1e-5)
            alone = model(**collate_for_generation([s], processor)).logits[0]
            assert torch.allclose(gen_logits[row, -alone.shape[0] :], alone, atol=1e-5)


def test_qwen3_greedy_eval_batched_equals_alone(qwen3_dir):
    from vlrl.eval import generate_responses

    model, processor = load_model(qwen3_dir, trainable=False), load_processor(qwen3_dir)
    samples = _samples()
    batched = generate_responses(model, processor, samples, max_new_tokens=4)
    assert batched == [generate_responses(model, processor, [s], max_new_tokens=4)[0] for s in samples]

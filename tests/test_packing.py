"""Online packing: a packed batch gives each record the loss it has alone, positions
(3-D mrope included) restart per record, the image-token cap and first-fit planning."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlrl.data.images import Sample
from vlrl.data.records import Record
from vlrl.model.batching import IGNORE_INDEX, collate_for_training
from vlrl.model.packing import PackedForward, collate_packed, encode_segments, first_fit, span_losses
from vlrl.model.tiny import build_tiny_model

CORPUS = ["What number is shown?", "Add the numbers, then multiply by 3.", "7 + 5 = 12. 12 * 3 = 36. \\boxed{36}", "Be brief."] * 40
_rng = np.random.default_rng(0)


@pytest.fixture(scope="module")
def mp():
    torch.manual_seed(0)
    model, processor = build_tiny_model(CORPUS, preset="micro", seed=0)
    model.eval()
    return model, processor


def _sample(i: int, n_img: int, question: str, answer: str) -> Sample:
    msgs = [{"role": "user", "content": [{"type": "image"}] * n_img + [{"type": "text", "text": question}]}, {"role": "assistant", "content": answer}]
    rec = Record(id=f"r{i}", messages=msgs, images=[f"{i}_{k}.png" for k in range(n_img)], answer="1")
    imgs = [Image.fromarray(_rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(n_img)]
    return Sample(rec, imgs, i + 1)


def _samples() -> list[Sample]:
    return [
        _sample(0, 1, "What number is shown?", "\\boxed{482}"),
        _sample(1, 0, "Add 3 and 4, then multiply by 3.", "3 + 4 = 7. 7 * 3 = 21. \\boxed{21}"),
        _sample(2, 2, "Add the numbers, then multiply by 3.", "7 + 5 = 12. 12 * 3 = 36. \\boxed{36}"),
        _sample(3, 0, "Be brief.", "\\boxed{7}"),
        _sample(4, 1, "What number is shown?", "\\boxed{5}"),
    ]


def _alone(model, processor, s: Sample) -> tuple[float, int]:
    batch = collate_for_training([s], processor, max_length=256)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (1, T, V)
    lb = batch["labels"][0, 1:]
    keep = lb != IGNORE_INDEX
    return float(torch.nn.functional.cross_entropy(logits[0, :-1][keep], lb[keep], reduction="sum")), int(keep.sum())


@torch.no_grad()
def test_packed_batch_gives_each_record_its_own_loss(mp):
    model, processor = mp
    samples = _samples()
    segs = encode_segments(samples, processor, max_length=256)
    lengths = [s.length for s in segs]
    T = sum(lengths[:3]) + 5  # row 0 holds records 0-2, row 1 records 3-4 and padding
    rows = [segs[:3], segs[3:]]
    packed = collate_packed(rows, processor, max_length=T, rope_index=model.model.get_rope_index)
    assert packed.inputs["input_ids"].shape == (2, T)
    logits = PackedForward(model)(**{k: v for k, v in packed.inputs.items() if k != "labels"}).logits
    got = span_losses(logits, packed.inputs["labels"], packed.spans)
    for s, (loss, n) in zip(samples, got):
        ref_loss, ref_n = _alone(model, processor, s)
        assert n == ref_n and n > 0
        assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (s.record.id, loss, ref_loss)
    assert 0.0 < packed.efficiency < 1.0
    assert packed.efficiency == pytest.approx(sum(lengths) / (2 * T))


@torch.no_grad()
def test_without_the_adapter_records_would_see_each_other(mp):
    """The check above is not vacuous: keeping the 2-D mask lets records attend across the boundary."""
    model, processor = mp
    samples = _samples()
    segs = encode_segments(samples, processor, max_length=256)
    packed = collate_packed([segs[:3]], processor, max_length=sum(s.length for s in segs[:3]), rope_index=model.model.get_rope_index)
    logits = model(**{k: v for k, v in packed.inputs.items() if k != "labels"}).logits
    loss, _ = span_losses(logits, packed.inputs["labels"], packed.spans)[2]
    assert abs(loss - _alone(model, processor, samples[2])[0]) > 1e-3


@torch.no_grad()
def test_positions_restart_per_record_including_mrope(mp):
    model, processor = mp
    samples = _samples()
    segs = encode_segments(samples, processor, max_length=256)
    packed = collate_packed([segs], processor, max_length=sum(s.length for s in segs) + 3, rope_index=model.model.get_rope_index)
    pos = packed.inputs["position_ids"]  # (4, 1, T)
    for s, (r, a, b) in zip(samples, packed.spans):
        alone = collate_for_training([s], processor, max_length=256)
        ref, _ = model.model.get_rope_index(alone["input_ids"], mm_token_type_ids=alone["mm_token_type_ids"], image_grid_thw=alone.get("image_grid_thw"))
        assert torch.equal(pos[1:, r, a:b], ref[:, 0])
        assert torch.equal(pos[0, r, a:b], torch.arange(b - a))
    # an image record's height/width positions differ from its text positions
    r, a, b = packed.spans[0]
    assert not torch.equal(pos[2, r, a:b], pos[0, r, a:b])
    assert int(packed.inputs["labels"][0, packed.spans[1][1]]) == IGNORE_INDEX


def test_first_fit_fills_rows_and_stops_after_lookahead():
    sizes = [(60, 0), (50, 16), (30, 0), (70, 16), (40, 0), (90, 0), (20, 0), (25, 0)]
    rows, left, examined = first_fit(sizes, rows=2, max_length=100, max_image_tokens=None, lookahead=2)
    assert rows == [[0, 2], [1, 4]]  # 60+30=90, 50+40=90 (item 3 and 5 fit nowhere)
    assert left == [3, 5] and examined == 6  # items 6, 7 were never looked at


def test_image_cap_spreads_image_records_over_rows():
    sizes = [(20, 16), (20, 16), (20, 16), (20, 0)]
    rows, left, _ = first_fit(sizes, rows=2, max_length=100, max_image_tokens=16, lookahead=4)
    assert rows == [[0, 3], [1]] and left == [2]
    # an empty row takes an over-cap record rather than starving it
    rows, left, _ = first_fit([(20, 64)], rows=1, max_length=100, max_image_tokens=16, lookahead=1)
    assert rows == [[0]] and left == []


def test_too_long_item_is_refused():
    with pytest.raises(ValueError, match="more than the pack length"):
        first_fit([(120, 0)], rows=1, max_length=100, max_image_tokens=None, lookahead=1)


def test_segments_from_positions_include_the_pad_tail():
    from vlrl.model.packed_attention import segments_from_positions

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert segments_from_positions(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 9)]]


def test_record_by_record_sdpa_matches_the_dense_mask_in_loss_and_grads():
    """The per-record SDPA path (packed_attention) and transformers' block-diagonal
    mask give the same logits and the same gradients on the same packed batch."""
    from vlrl.model.packed_attention import ATTENTION_NAME, language_config

    torch.manual_seed(0)
    model, processor = build_tiny_model(CORPUS, preset="micro", seed=0)
    segs = encode_segments(_samples(), processor, max_length=256)
    packed = collate_packed([segs[:3], segs[3:]], processor, max_length=sum(s.length for s in segs[:3]) + 5,
                            rope_index=model.model.get_rope_index)
    inputs = {k: v for k, v in packed.inputs.items() if k != "labels"}

    def loss_and_grads(forward):
        model.zero_grad()
        logits = forward(**inputs).logits
        losses = span_losses(logits, packed.inputs["labels"], packed.spans)
        total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), packed.inputs["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        total.backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert language_config(model)._attn_implementation == "sdpa"
    dense = PackedForward(model)
    dense.by_record = False  # transformers' block-diagonal mask from the position restarts
    ref_losses, ref_grads = loss_and_grads(dense)
    by_record = PackedForward(model)
    assert by_record.by_record and language_config(model)._attn_implementation == ATTENTION_NAME
    got_losses, got_grads = loss_and_grads(by_record)
    for (a, n), (b, m) in zip(got_losses, ref_losses):
        assert n == m and abs(a - b) <= 1e-5 * max(1.0, abs(b))
    assert got_grads.keys() == ref_grads.keys()
    for name, g in got_grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # vision attention keeps its own backend
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_only_sdpa_is_switched():
    from vlrl.model.packed_attention import language_config

    model, _ = build_tiny_model(CORPUS, preset="micro", seed=0)
    model.set_attn_implementation("eager")
    assert not PackedForward(model).by_record
    assert language_config(model)._attn_implementation == "eager"


def test_record_by_record_is_the_cpu_default_and_accelerators_keep_sdpa():
    from vlrl.model.packed_attention import language_config

    model, _ = build_tiny_model(CORPUS, preset="micro", seed=0)
    assert not PackedForward(model, by_record=False).by_record
    assert language_config(model)._attn_implementation == "sdpa"  # the dense path changes nothing
    model.to("meta")  # parameters off the CPU, as on a GPU: the dense block-diagonal mask
    assert not PackedForward(model).by_record
    assert language_config(model)._attn_implementation == "sdpa"
    model.to_empty(device="cpu")
    assert PackedForward(model).by_record

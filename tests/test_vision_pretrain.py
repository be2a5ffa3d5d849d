"""The tiny tower's scene-label pretraining: labels land on the right patches, in the
order the processor lays patches out, and a short run teaches the tower to tell them apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlrl.data.synth.render import Scene, Shape, Text, render
from vlrl.model import vision_pretrain as V

PATCH = 14


def test_a_square_labels_exactly_the_patches_it_covers():
    scene = Scene(items=[Shape("square", "red", (28, 14, 55, 41))])  # patches (row 1-2, col 2-3)
    labels = V.patch_labels(scene, PATCH)
    red_square = V.shape_class("red", "square")
    hit = {(i // 8, i % 8) for i, c in enumerate(labels) if c == red_square}
    assert hit == {(1, 2), (1, 3), (2, 2), (2, 3)} and labels.count(0) == 60


def test_text_labels_each_character_left_to_right():
    scene = Scene(items=[Text("71", (10, 40), 44, (0, 0, 0))])
    row = [c for c in V.patch_labels(scene, PATCH)[3 * 8 : 4 * 8] if c]  # the row through the glyphs' middle
    assert row[0] == V.char_class("7") and row[-1] == V.char_class("1")
    assert V.char_class(" ") == 0 and V.N_CLASSES == V.char_class("Z") + 1


def test_merge_order_matches_the_processors_patch_layout(tmp_path):
    """Paint one patch; the processor's pixel rows that differ from the background are the
    ones merge_order puts that patch's label at."""
    from vlrl.model.tiny import build_tiny_model

    _, processor = build_tiny_model(["a b c"] * 20, preset="micro", seed=0)
    for r, c in ((0, 5), (6, 1), (7, 7)):
        img = np.full((112, 112, 3), 255, np.uint8)
        img[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = (255, 0, 0)
        from PIL import Image

        px = processor.image_processor(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]  # (64, 1176)
        changed = (px - px[0 if (r, c) != (0, 0) else 1]).abs().sum(1).nonzero().flatten().tolist()
        raster = [0] * 64
        raster[r * 8 + c] = 1
        order = [lab for tok in V.merge_order(raster, 8, 2) for lab in tok]
        assert changed == [order.index(1)]


@pytest.mark.timeout(120)
def test_a_short_run_teaches_the_tower_what_it_sees():
    from vlrl.model.tiny import build_tiny_model

    model, processor = build_tiny_model(["a b c"] * 20, preset="micro", seed=0)
    text_before = {n: p.detach().clone() for n, p in model.named_parameters() if "visual" not in n}
    torch.set_num_threads(1)
    out = V.pretrain_vision(model, processor, steps=60, lr=3e-3, batch_size=16, pool=300, held_out=60, seed=0)
    assert out["fg_accuracy"] > out["fg_accuracy_before"] + 0.1, out
    assert out["bg_accuracy"] > 0.8
    # The language model is untouched (only the tower and a throwaway head train).
    assert all(torch.equal(p, text_before[n]) for n, p in model.named_parameters() if n in text_before)
    assert render(Scene()).size == (112, 112)


def test_the_model_stage_pretrains_the_tiny_tower_when_asked(tmp_path):
    from safetensors.torch import load_file

    from vlrl.recipe import validate_recipe
    from vlrl.runner import run_recipe

    def build(name, **extra):
        raw = {"name": name, "run_dir": str(tmp_path / name), "device": "cpu", "threads": 1, "tracking": {"tensorboard": False},
               "stages": {"model": {"preset": "micro", "corpus_size": 300, "eval": False, **extra}}}
        run_recipe(validate_recipe(raw))
        return load_file(str(tmp_path / name / "model" / "checkpoint" / "model.safetensors"))

    plain = build("plain")
    tuned = build("tuned", vision_pretrain={"steps": 3, "batch_size": 4})
    assert set(plain) == set(tuned)
    changed = {k for k in plain if not torch.equal(plain[k], tuned[k])}
    assert changed and all("visual" in k for k in changed)  # the tower moved, nothing else did


def test_families_choose_whose_scenes_label_the_tower():
    """Reasoning scenes are rows of numbers: with them in, digits make up far more of the
    labelled patches than on perception scenes alone (where shapes dominate)."""
    digits = {V.char_class(c) for c in "0123456789"}

    def digit_share(families):
        labels = [lab for _, toks in V.scene_examples(0, 80, PATCH, 2, families) for tok in toks for lab in tok if lab]
        return sum(lab in digits for lab in labels) / len(labels)

    assert digit_share(("reasoning",)) > 0.35 > 0.2 > digit_share(("perception",))
    both = V.scene_examples(0, 40, PATCH, 2, ("perception", "reasoning"))
    assert [np.asarray(im).tobytes() for im, _ in both] == [np.asarray(im).tobytes() for im, _ in V.scene_examples(0, 40, PATCH, 2, ("perception", "reasoning"))]


def test_vision_pretrain_families_are_checked():
    from vlrl.errors import RecipeError
    from vlrl.recipe import validate_recipe

    raw = {"name": "x", "stages": {"model": {"preset": "micro", "vision_pretrain": {"steps": 1, "families": ["text"]}}}}
    with pytest.raises(RecipeError, match=r"stages\.model\.vision_pretrain\.families\.0"):
        validate_recipe(raw)

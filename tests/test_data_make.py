"""make_dataset: deterministic files, a held-out eval split, a manifest that matches."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlrl.answers import answer_type_for, is_correct
from vlrl.data.io import load_records
from vlrl.data.synth import TASKS, make_dataset
from vlrl.data.synth import writer
from vlrl.data.synth.render import render
from vlrl.errors import VlrlError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    make_dataset(tmp_path / "a", seed=7, n=60, n_eval=20)
    make_dataset(tmp_path / "b", seed=7, n=60, n_eval=20)
    make_dataset(tmp_path / "c", seed=8, n=60, n_eval=20)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) > 3 and a == b
    assert a["train.jsonl"] != c["train.jsonl"]


def test_parquet_is_deterministic_and_holds_the_same_records(tmp_path):
    make_dataset(tmp_path / "j", seed=1, n=40, n_eval=10)
    make_dataset(tmp_path / "p", seed=1, n=40, n_eval=10, fmt="parquet")
    make_dataset(tmp_path / "p2", seed=1, n=40, n_eval=10, fmt="parquet")
    assert _files(tmp_path / "p") == _files(tmp_path / "p2")
    for split in ("train", "eval"):
        assert load_records(tmp_path / "p" / f"{split}.parquet") == load_records(tmp_path / "j" / f"{split}.jsonl")
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["format"] == "parquet"


def _content_keys(root: Path, split: str) -> set[str]:
    keys = set()
    for r in load_records(root / f"{split}.jsonl"):
        h = hashlib.sha1(r.prompt_messages()[-1].parts()[-1].text.encode())
        for p in r.images:
            h.update(Image.open(root / p).convert("RGB").tobytes())
        keys.add(h.hexdigest())
    return keys


def test_eval_is_held_out_and_every_record_checks(tmp_path):
    m = make_dataset(tmp_path, seed=3, n=200, n_eval=60)
    train, ev = load_records(tmp_path / "train.jsonl"), load_records(tmp_path / "eval.jsonl")
    assert (len(train), len(ev)) == (200, 60)
    assert not {r.id for r in train} & {r.id for r in ev}
    assert not _content_keys(tmp_path, "train") & _content_keys(tmp_path, "eval")
    for r in train + ev:
        assert is_correct(r.target_text(), r.answer, answer_type_for(r.task, r.meta))
        assert r.family == TASKS[r.task].family and 1 <= r.difficulty <= 5
        for p in r.images:
            assert Image.open(tmp_path / p).size == (112, 112)
    assert {r.task for r in train} == set(TASKS)
    assert m["counts"]["train"]["task"] == dict(sorted(Counter(r.task for r in train).items()))
    assert m["counts"]["eval"]["difficulty"] == {str(d): 12 for d in range(1, 6)}
    assert m["eval_unfilled"] == 0
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(m)) and on_disk["seed"] == 3 and on_disk["version"] == writer.VERSION


def test_eval_redraws_an_item_already_in_train():
    slots = [("read_digits", 1)]
    item = TASKS["read_digits"].generate(writer.item_rng(0, "eval", 0, 0), 1)
    seen = {writer._content_key(item.question, render(item.scene))}
    (record, image), = writer._generate(0, "eval", slots, seen, dedupe=True)
    assert writer._content_key(record.prompt_messages()[-1].parts()[-1].text, image) in seen
    assert len(seen) == 2  # the redraw was added, the train copy was not produced again
    assert image.tobytes() != render(item.scene).tobytes()


def test_eval_cells_that_run_out_are_left_out():
    # text_fact level 1 "sides" has two questions; with all of them already in train, redraws fail.
    slots = [("text_fact", 1)] * 3
    seen: set[bytes] = set()
    for a in range(writer._MAX_REDRAWS):
        for i in range(3):
            item = TASKS["text_fact"].generate(writer.item_rng(0, "eval", i, a), 1)
            seen.add(writer._content_key(item.question, None))
    assert list(writer._generate(0, "eval", slots, seen, dedupe=True)) == []


def test_families_mix_and_its_errors(tmp_path):
    m = make_dataset(tmp_path, seed=0, n=30, n_eval=5, families_mix={"text": 1.0})
    recs = load_records(tmp_path / "train.jsonl")
    assert {r.family for r in recs} == {"text"} and all(not r.images for r in recs)
    assert m["counts"]["train"]["family"] == {"text": 30}
    with pytest.raises(VlrlError, match="unknown family 'vision'"):
        make_dataset(tmp_path, seed=0, n=5, families_mix={"vision": 1.0})
    with pytest.raises(VlrlError, match="families_mix.text"):
        make_dataset(tmp_path, seed=0, n=5, families_mix={"text": -1})
    with pytest.raises(VlrlError, match="format 'csv'"):
        make_dataset(tmp_path, seed=0, n=5, fmt="csv")


def test_rerun_in_the_same_directory_leaves_no_stale_images(tmp_path):
    make_dataset(tmp_path, seed=0, n=80, n_eval=10)
    make_dataset(tmp_path, seed=0, n=20, n_eval=10)
    referenced = {p for split in ("train", "eval") for r in load_records(tmp_path / f"{split}.jsonl") for p in r.images}
    on_disk = {f"images/{p.name}" for p in (tmp_path / "images").iterdir()}
    assert on_disk == referenced


def test_plan_is_exact_and_covers_every_cell():
    slots = writer.plan(500, writer.DEFAULT_MIX, random.Random(0))
    fam = Counter(TASKS[t].family for t, _ in slots)
    assert fam == {"perception": 225, "reasoning": 175, "text": 100}
    assert len(set(slots)) == len(TASKS) * 5


@pytest.mark.slow
def test_ten_thousand_records_take_well_under_a_minute(tmp_path):
    t = time.perf_counter()
    m = make_dataset(tmp_path, seed=0, n=10_000, n_eval=1_000)
    assert m["counts"]["train"]["total"] == 10_000
    assert time.perf_counter() - t < 45


def test_exclude_keeps_another_datasets_held_out_records_out_of_train(tmp_path):
    """A text corpus generated beside a dataset: same world, so without `exclude` some of
    the dataset's held-out questions show up in the corpus's train split."""
    make_dataset(tmp_path / "main", seed=3, n=40, n_eval=60, families_mix={"text": 1.0})
    held_out = writer.held_out_keys(tmp_path / "main")
    assert len(held_out) == 60
    make_dataset(tmp_path / "plain", seed=4, n=600, n_eval=5, families_mix={"text": 1.0})
    m = make_dataset(tmp_path / "corpus", seed=4, n=600, n_eval=5, families_mix={"text": 1.0}, exclude=held_out)
    main_eval = _content_keys(tmp_path / "main", "eval")
    assert _content_keys(tmp_path / "plain", "train") & main_eval  # the world is small: overlap without exclude
    train = load_records(tmp_path / "corpus" / "train.jsonl")
    assert not _content_keys(tmp_path / "corpus", "train") & main_eval
    assert m["excluded_keys"] == 60 and m["train_unfilled"] == 600 - len(train) and len(train) >= 590


def test_held_out_keys_match_the_generator_for_image_records(tmp_path):
    make_dataset(tmp_path / "a", seed=5, n=10, n_eval=30)
    keys = writer.held_out_keys(tmp_path / "a")
    slots = writer.plan(30, writer.check_mix(None), random.Random("vlrl-synth/5/eval/plan"))
    regenerated = {writer._content_key(item.question, img) for item, img in (
        (lambda it: (it, render(it.scene) if it.scene is not None else None))(TASKS[t].generate(writer.item_rng(5, "eval", i), d))
        for i, (t, d) in enumerate(slots))}
    assert len(keys) == 30 and len(keys & regenerated) >= 28  # a few eval slots may have been redrawn

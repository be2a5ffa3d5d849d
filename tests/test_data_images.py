"""Image loading: RGB out, one-line errors naming file, row and image; skip mode counts."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from vlrl.data.images import RecordDataset, load_images
from vlrl.data.io import data_uri, load_records, write_records
from vlrl.data.records import Record
from vlrl.data.synth import TASKS, make_dataset
from vlrl.data.synth.render import png_bytes, render
from vlrl.errors import DataError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    make_dataset(root, seed=5, n=30, n_eval=5, families_mix={"perception": 1.0})
    return root


def test_dataset_yields_rgb_samples_with_rows(data):
    ds = RecordDataset(data / "train.jsonl")
    assert len(ds) == 30
    s = ds[3]
    assert s.row == 4 and s.record.id == "train-000003"
    assert len(s.images) == 1 and s.images[0].mode == "RGB" and s.images[0].size == (112, 112)


def test_grey_and_rgba_images_come_back_rgb(tmp_path):
    rec = Record(id="x", messages=[{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}],
                 images=[png_bytes(Image.new("L", (20, 10), 128)), data_uri(png_bytes(Image.new("RGBA", (5, 5))))])
    imgs = load_images(rec, tmp_path, source="mem.jsonl", row=1)
    assert [(im.mode, im.size) for im in imgs] == [("RGB", (20, 10)), ("RGB", (5, 5))]


def _copy_with_bad_image(data, tmp_path, damage):
    recs = load_records(data / "train.jsonl")[:4]
    (tmp_path / "images").mkdir()
    for r in recs:
        (tmp_path / r.images[0]).write_bytes((data / r.images[0]).read_bytes())
    damage(tmp_path / recs[2].images[0])
    write_records(tmp_path / "train.jsonl", recs)
    return tmp_path / "train.jsonl", recs[2].images[0]


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda p: p.write_bytes(b"this is not a png at all" * 10), "is not a readable image (UnidentifiedImageError"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is not a readable image"),
    (lambda p: p.unlink(), "missing (no file"),
])
def test_bad_image_error_names_file_row_and_image(data, tmp_path, damage, expected):
    path, image = _copy_with_bad_image(data, tmp_path, damage)
    ds = RecordDataset(path)
    assert ds[1] is not None
    with pytest.raises(DataError) as e:
        ds[2]
    msg = str(e.value)
    assert f"file {path} line 3: image '{image}'" in msg and expected in msg and "\n" not in msg


def test_skip_mode_returns_none_and_counts_rows_once(data, tmp_path):
    path, image = _copy_with_bad_image(data, tmp_path, lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\ngarbage"))
    ds = RecordDataset(path, on_bad_image="skip")
    out = [ds[i] for i in range(len(ds))] + [ds[2]]  # a second epoch's visit to the bad row
    assert [s is None for s in out] == [False, False, True, False, True]
    assert ds.skipped == 1
    assert list(ds.skip_reasons) == [3] and image in ds.skip_reasons[3]
    with pytest.raises(DataError, match="on_bad_image must be 'error' or 'skip'"):
        RecordDataset(path, on_bad_image="ignore")


def test_bad_inline_images(tmp_path):
    rec = Record(id="x", messages=[{"role": "user", "content": [{"type": "image"}]}], images=["data:image/png;base64,@@@"])
    with pytest.raises(DataError, match=r"file d.parquet row 7: image 0 \(inline data URI\) is not valid base64"):
        load_images(rec, tmp_path, source="d.parquet", row=7)
    rec = Record(id="x", messages=[{"role": "user", "content": [{"type": "image"}]}], images=[b"junk"])
    with pytest.raises(DataError, match=r"row 7: image 0 \(inline bytes\) is not a readable image"):
        load_images(rec, tmp_path, source="d.parquet", row=7)


def test_rendered_samples_for_inspection(tmp_path):
    """Saves a contact sheet (task rows x difficulty columns) to look at by eye, and checks
    what a reader would: every tile has clearly visible content, and the pixel noise that
    the scene asks for is there and grows with difficulty."""
    tasks = [t for t in TASKS if TASKS[t].family != "text"]
    sheet = Image.new("RGB", (5 * 116, len(tasks) * 116), (60, 60, 60))
    for row, task in enumerate(tasks):
        noise = []
        for d in range(1, 6):
            item = TASKS[task].generate(random.Random(f"inspect/{task}/{d}"), d)
            img = render(item.scene)
            arr = np.asarray(img, dtype=float)
            assert (np.abs(arr - np.asarray(item.scene.background)).max(axis=2) > 100).mean() > 0.01
            clean = np.asarray(render(replace(item.scene, noise=0.0)), dtype=float)
            noise.append((arr - clean).std())
            sheet.paste(img, ((d - 1) * 116 + 2, row * 116 + 2))
        assert noise[0] == noise[1] == 0 and 0 < noise[2] < noise[3] < noise[4], noise
    out = tmp_path / "synth_samples.png"
    sheet.save(out)
    assert Image.open(out).size == (580, len(tasks) * 116)


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("train.jsonl", b"", "no records (empty)"),
    ("eval.jsonl", b"\n  \n", "no records (only blank lines)"),
])
def test_a_file_without_records_is_an_error_naming_it(tmp_path, name, content, expected):
    """Not a dataset of 0 records: an empty train split would fail later as a phase whose
    selection matches nothing, an empty eval split would score 0% of 0 and pass."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"file {tmp_path / name}: {re.escape(expected)}"):
        RecordDataset(tmp_path / name)


def test_a_parquet_file_without_rows_is_an_error(tmp_path):
    write_records(tmp_path / "eval.parquet", [])
    with pytest.raises(DataError, match=r"eval\.parquet: no records \(empty\)"):
        RecordDataset(tmp_path / "eval.parquet")


def test_records_is_read_once_not_rebuilt_per_access(data):
    """The RL controller indexes `records` per group several times a step; a list rebuilt
    on each read made every index O(dataset) (about 13% of a step on 20,000 prompts)."""
    from vlrl.data.images import RecordDatasets

    ds = RecordDataset(data / "train.jsonl")
    assert ds.records is ds.records
    assert [r.id for r in ds.records] == [r.id for r in load_records(data / "train.jsonl")]
    both = RecordDatasets([ds, RecordDataset(data / "train.jsonl")])
    assert both.records is both.records and len(both.records) == 2 * len(ds)
    assert both.records[len(ds)].id == ds.records[0].id

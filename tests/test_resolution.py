"""Test-time resolution search: grids, pixel bounds that really change the image tokens,
settings with identical inputs evaluated once, best setting and spread per family."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlrl.data.synth import make_dataset
from vlrl.errors import VlrlError
from vlrl.eval import load_eval_samples
from vlrl.model.batching import collate_for_generation
from vlrl.model.tiny import build_tiny_model
from vlrl.resolution import GRIDS, SettingResult, best_per_family, parse_grid, resolution_search, token_pixels, with_bounds

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("res")
    make_dataset(d / "data", seed=4, n=20, n_eval=10)
    samples, _ = load_eval_samples(d / "data" / "eval.jsonl", limit=None, on_bad_image="error")
    corpus = [m.parts()[-1].text or "" for s in samples for m in s.record.messages] * 20
    model, processor = build_tiny_model(corpus, preset="micro", seed=0)
    model.save_pretrained(d / "ckpt")
    processor.save_pretrained(d / "ckpt")
    return d, samples, processor


def test_grids_and_parsing():
    assert len(GRIDS["mindvl"].settings()) == 24
    assert (25, 9) not in GRIDS["tiny"].settings() and (4, 36) in GRIDS["tiny"].settings()
    assert parse_grid("4,16:9,16").settings() == [(4, 9), (4, 16), (16, 16)]
    with pytest.raises(VlrlError, match="expected a grid name .mindvl, tiny."):
        parse_grid("big")
    with pytest.raises(VlrlError, match="no setting"):
        parse_grid("36:9")


@pytest.mark.parametrize("lo,hi,tokens", [(4, 9, 9), (4, 16, 16), (25, 36, 25), (16, 36, 16)])
def test_bounds_change_the_image_token_count(world, lo, hi, tokens):
    _, samples, processor = world
    s = next(s for s in samples if len(s.images) == 1)
    proc = with_bounds(processor, lo * token_pixels(processor), hi * token_pixels(processor))
    batch = collate_for_generation([s], proc)
    assert int((batch["mm_token_type_ids"] == 1).sum()) == tokens
    assert int((collate_for_generation([s], processor)["mm_token_type_ids"] == 1).sum()) == 16  # original untouched


def test_search_evaluates_each_distinct_input_once(world):
    d, samples, _ = world
    rep = resolution_search(d / "ckpt", d / "data" / "eval.jsonl", grid=parse_grid("9,25:9,16,36"), batch_size=10, max_new_tokens=4)
    labels = {f"{s.min_tokens}-{s.max_tokens}": s for s in rep.settings}
    assert set(labels) == {"9-9", "9-16", "9-36", "25-36"}
    assert labels["9-36"].shared_with == "9-16" and labels["9-16"].shared_with is None  # 112px images stay at 16 tokens
    assert [round(labels[k].image_tokens) for k in ("9-9", "9-16", "25-36")] == [9, 16, 25]
    assert rep.n == len(samples)
    fams = {b.family for b in rep.best}
    assert "all" in fams and fams - {"all"} == {s.record.family for s in samples}
    assert all(b.spread >= 0 and b.best in labels for b in rep.best)


def test_best_and_spread_per_family():
    mk = lambda lo, hi, tok, acc, fam: SettingResult(min_tokens=lo, max_tokens=hi, min_pixels=0, max_pixels=0, image_tokens=tok, accuracy=acc, by_family=fam)  # noqa: E731
    settings = [mk(4, 9, 9, 0.2, {"perception": 0.1, "text": 0.5}), mk(4, 16, 16, 0.3, {"perception": 0.4, "text": 0.5}), mk(25, 36, 25, 0.25, {"perception": 0.3, "text": 0.4})]
    best = {b.family: b for b in best_per_family(settings)}
    assert best["perception"].best == "4-16" and best["perception"].spread == pytest.approx(0.3)
    assert best["text"].best == "4-9"  # a tie goes to fewer image tokens
    assert best["all"].best == "4-16" and best["all"].worst == pytest.approx(0.2)


def test_cli_eval_resolutions(world, tmp_path):
    d, _, _ = world
    res = subprocess.run([sys.executable, "-m", "vlrl.cli", "eval", "--model", str(d / "ckpt"), "--data", str(d / "data"), "--limit", "4",
                          "--max-new-tokens", "4", "--device", "cpu", "--resolutions", "4,16:9,16", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resolution search" in res.stdout and "best per family" in res.stdout
    assert '"best"' in (tmp_path / "r.json").read_text()

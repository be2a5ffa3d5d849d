"""Schedules against their formulas; the sampler as a pure function of (seed, phase, k)."""

from __future__ import annotations

import math

import pytest

from sft.sampler import BatchSampler
from sft.schedule import lr_factor


def test_warmup_is_linear():
    assert lr_factor(0, 100, schedule="cosine", warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(4, 100, schedule="cosine", warmup=10, min_ratio=0.1) == pytest.approx(0.5)


def test_cosine_matches_formula():
    total, warm, mr = 110, 10, 0.1
    for step in (10, 35, 60, 109):
        p = (step - warm) / (total - warm)
        want = mr + (1 - mr) * 0.5 * (1 + math.cos(math.pi * p))
        assert lr_factor(step, total, schedule="cosine", warmup=warm, min_ratio=mr) == pytest.approx(want)


def test_wsd_flat_then_linear_decay():
    kw = dict(schedule="wsd", warmup=0, min_ratio=0.0, decay_ratio=0.2)
    assert lr_factor(0, 100, **kw) == 1.0
    assert lr_factor(79, 100, **kw) == 1.0
    assert lr_factor(80, 100, **kw) == pytest.approx(1 - 1 / 20)
    assert lr_factor(99, 100, **kw) == pytest.approx(0.0)


def test_constant_and_unknown():
    assert lr_factor(50, 100, schedule="constant", warmup=5, min_ratio=0.0) == 1.0
    with pytest.raises(ValueError):
        lr_factor(1, 10, schedule="linear", warmup=0, min_ratio=0.0)


def test_sampler_covers_each_epoch_exactly_once():
    s = BatchSampler(10, 4, seed=3)
    stream = [i for k in range(5) for i in s.batch(k)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]


def test_sampler_is_pure_in_k():
    a = BatchSampler(37, 5, seed=1, phase=2)
    b = BatchSampler(37, 5, seed=1, phase=2)
    assert [a.batch(k) for k in (9, 3, 0)] == [b.batch(k) for k in (9, 3, 0)]
    assert BatchSampler(37, 5, seed=2, phase=2).batch(0) != a.batch(0)
    assert BatchSampler(37, 5, seed=1, phase=1).batch(0) != a.batch(0)


def test_weighted_sampler_follows_weights():
    s = BatchSampler(2, 1000, seed=0, weights=[0.9, 0.1])
    draw = s.batch(0)
    assert 850 < draw.count(0) < 950
    assert s.batch(0) == draw


def test_empty_selection_is_refused():
    with pytest.raises(ValueError):
        BatchSampler(0, 4, seed=0)

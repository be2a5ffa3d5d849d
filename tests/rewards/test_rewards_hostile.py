"""The hostile corpus: nothing hangs, the pool survives, every failure says why."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from rewards import RewardSample, RewardStack

_spec = importlib.util.spec_from_file_location("rewards_hostile_corpus", Path(__file__).with_name("rewards_hostile_corpus.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


@pytest.fixture(scope="module")
def scored():
    stack = RewardStack.from_config(H.stack_config(timeout=1.0, workers=2))
    stack.start()
    samples = H.samples()
    t0 = time.perf_counter()
    results = stack.score(samples)
    elapsed = time.perf_counter() - t0
    yield stack, samples, results, elapsed
    stack.close()


def test_corpus_is_large_enough():
    assert len(H.CASES) >= 30
    assert len({c[0] for c in H.CASES}) == len(H.CASES)


@pytest.mark.parametrize("case", range(len(H.CASES)), ids=[c[0] for c in H.CASES])
def test_each_case_reports_its_cause(scored, case):
    _, _, results, _ = scored
    name, comp, _, expect = H.CASES[case]
    r = results[case]
    if isinstance(expect, tuple):
        assert comp not in r.failures, f"{name}: unexpected failure {r.failures}"
        assert r.components[comp] == expect[1]
    else:
        assert comp in r.failures, f"{name}: expected a failure containing {expect!r}, got {r.components}"
        assert expect in r.failures[comp], f"{name}: {r.failures[comp]!r}"
        assert r.components[comp] == 0.0  # the configured fallback
        assert r.total == 0.0
        assert len(r.failures[comp]) <= 400


def test_nothing_hangs_and_time_is_bounded_by_timeouts(scored):
    stack, _, _, elapsed = scored
    n_hangs = sum(1 for c in H.CASES if c[3] == "timeout")
    # every hang costs at most its timeout (+ a replacement worker's start) on 2 workers
    assert elapsed < 10 + n_hangs * 4, elapsed
    assert stack.pool_stats.timeouts >= n_hangs


def test_metrics_count_failures(scored):
    stack, _, results, _ = scored
    m = stack.metrics()
    assert m["reward/fail_count"] == sum(1 for r in results if r.failures)
    assert m["reward/hang/fail_count"] == 1
    assert m["reward/pool/timeouts"] >= 6
    assert m["reward/pool/crashes"] >= 3


def test_pool_survives_and_keeps_scoring(scored):
    stack, _, _, _ = scored
    assert all(w.proc.is_alive() for w in stack._pool._workers)
    again = stack.score([RewardSample(response="x", rewards=["ok"]), RewardSample(response=r"\boxed{\frac{1}{2}}", answer="0.5", rewards=["math_accuracy"])])
    assert again[0].components == {"ok": 1.0} and again[1].components == {"math_accuracy": 1.0}
    assert not again[0].failures and not again[1].failures


def test_inputs_are_not_mutated(scored):
    _, samples, _, _ = scored
    assert all(s.group == () and s.scores == {} and s.correct is None for s in samples)


def test_script_without_main_guard_fails_fast_with_a_hint(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from rewards import RewardSample, RewardStack\n"
        "stack = RewardStack.from_config({'components': {'m': 'exact_match'}, 'workers': 1})\n"
        "r = stack.score([RewardSample(response='x', answer='x')])[0]\n"
        "print('FAILURE:', r.failures.get('m'))\n"
        "stack.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FAILURE:" in out.stdout and "__main__" in out.stdout
    assert time.perf_counter() - t0 < 60

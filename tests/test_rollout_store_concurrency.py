"""The store under a live writer: readers see whole batches while it appends, and a writer
killed with SIGKILL mid-append leaves only whole batches behind.

The writer is this file run as a script (`python tests/test_rollout_store_concurrency.py
writer ...`), so each test drives a real second process."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _uncommitted_wal_frames(path: Path) -> int:
    """Frames of the current WAL generation written after its last commit frame.

    WAL format: a 32-byte header (page size at 8, salts at 16), then frames of a 24-byte
    header (database size after commit at 4, 0 for non-commit frames; salts at 8) + a page."""
    data = (Path(str(path) + "-wal")).read_bytes()
    if len(data) < 32:
        return 0
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    frames, last_commit, off = 0, 0, 32
    while off + 24 + page_size <= len(data) and data[off + 8 : off + 16] == salts:
        frames += 1
        if struct.unpack(">I", data[off + 4 : off + 8])[0] != 0:
            last_commit = frames
        off += 24 + page_size
    return frames - last_commit


def _rows(batch: int, n: int, text_chars: int, meta_chars: int = 0):
    from rollout.store import RolloutRow

    filler = "x" * text_chars
    return [
        RolloutRow(
            step=batch,
            policy_version=batch,
            group_id=f"b{batch}g{i // 4}",
            sample_index=i % 4,
            record_id=f"r{i}",
            task="arith",
            prompt=[{"role": "user", "content": f"prompt {batch} {i // 4}"}],
            response=f"{batch}:{i}:{filler}",
            response_tokens=i,
            components={"accuracy": float(i % 2), "length": -0.01 * i},
            total_reward=float(i % 2),
            advantage=0.0,
            meta={"pad": "m" * meta_chars} if meta_chars else {},
        )
        for i in range(n)
    ]


def writer(path: str, batches: int, n: int, text_chars: int, pause_s: float, cache_mib: float, die_in_batch: int, first_step: int) -> None:
    """Append `batches` batches of `n` rows, printing 'committed <k>' after each.

    With die_in_batch >= 0 the process SIGKILLs itself half-way through inserting that
    batch's rows; rows carry 2 KB of meta each, so with a small page cache the batch's
    pages have spilled into the WAL by then (the test checks that they had)."""
    import rollout.store as st

    st.CACHE_MIB = cache_mib
    store = st.RolloutStore(path)
    real = st._row_tuple
    for k in range(batches):
        if k == die_in_batch:
            calls = {"n": 0}

            def dying(*args, _real=real, _calls=calls):
                _calls["n"] += 1
                if _calls["n"] == n // 2:
                    print("dying", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                return _real(*args)

            st._row_tuple = dying
        store.append(_rows(first_step + k, n, text_chars, meta_chars=2000 if die_in_batch >= 0 else 0))
        print(f"committed {k}", flush=True)
        if pause_s:
            time.sleep(pause_s)
    store.close()


def _spawn(path: Path, *, batches: int, n: int, text_chars: int = 200, pause_s: float = 0.0, cache_mib: float = 64, die_in_batch: int = -1, first_step: int = 0):
    args = (path, batches, n, text_chars, pause_s, cache_mib, die_in_batch, first_step)
    cmd = [sys.executable, __file__, "writer", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_whole_batches(path: Path, n: int) -> int:
    from rollout.store import RolloutStore

    with RolloutStore(path) as s:
        assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        total = s.count()
        batches = s.batches()
        assert total == n * len(batches)
        assert all(rows == n for _, rows in batches)
        per_step = {x.step: x.n for x in s.step_summaries()}
        assert per_step == {k: n for k in range(len(batches))}  # whole batches, in order
        # every stored row has its response and its prompt
        got = [r for off in range(0, total, 10_000) for r in s.query(limit=10_000, offset=off)]
        assert len(got) == total and all(r.response.startswith(f"{r.step}:") for r in got)
        return len(batches)


def test_reader_sees_only_whole_batches_while_a_writer_appends(tmp_path):
    from rollout.store import RolloutStore

    path = tmp_path / "rollouts.sqlite"
    RolloutStore(path).close()  # the stage creates the store before its readers start
    n, batches = 40, 25
    proc = _spawn(path, batches=batches, n=n, pause_s=0.15)  # ~4 s of appends: a reader slowed by a busy machine still sees it grow
    reader = RolloutStore(path, readonly=True)
    seen = []
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        c = reader.count()
        rows = reader.query(limit=10_000)
        assert c % n == 0 and len(rows) % n == 0
        assert all(len(reader.group(g)) == 4 for g in {r.group_id for r in rows[-n:]})
        seen.append(c)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert seen == sorted(seen)  # never goes back
    assert len({c for c in seen if 0 < c < n * batches}) >= 3  # saw it grow while running
    assert reader.count() == n * batches
    reader.close()
    assert _check_whole_batches(path, n) == batches


def test_writer_killed_inside_a_transaction_leaves_whole_batches(tmp_path):
    path = tmp_path / "rollouts.sqlite"
    n = 600  # half a batch of rows is ~600 KB: more than the writer's 256 KB page cache
    proc = _spawn(path, batches=5, n=n, text_chars=100, cache_mib=0.25, die_in_batch=3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert out.split() == ["committed", "0", "committed", "1", "committed", "2", "dying"]
    assert _uncommitted_wal_frames(path) > 10  # batch 3 had reached the WAL, uncommitted
    assert _check_whole_batches(path, n) == 3
    # and the store takes new batches after the crash
    from rollout.store import RolloutStore

    with RolloutStore(path) as s:
        s.append(_rows(3, n, 10))
    assert _check_whole_batches(path, n) == 4


def test_writer_killed_at_random_moments_leaves_whole_batches(tmp_path):
    path = tmp_path / "rollouts.sqlite"
    n = 300
    rng = random.Random(0)
    committed = 0
    for _ in range(3):
        # each round continues the run where the last one died, like a resumed stage
        proc = _spawn(path, batches=1000, n=n, text_chars=1000, cache_mib=0.25, first_step=committed)
        line = proc.stdout.readline()
        assert line.startswith("committed"), proc.stderr.read()
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        now = _check_whole_batches(path, n)
        assert now > committed
        committed = now


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "writer":
    sys.path.insert(0, str(ROOT))
    p, b, n, chars, pause, cache, die, first = sys.argv[2:10]
    writer(p, int(b), int(n), int(chars), float(pause), float(cache), int(die), int(first))

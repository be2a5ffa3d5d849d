"""Inspection server: filtered listing latency through HTTP over a store of 100,000 rollouts,
and the server's memory.

Builds the same store as bench_rollout_store.py (500 steps x 25 groups x 8 samples) in a
temp run directory, starts `vlrl serve` in its own process on a free loopback port, and
sends the same random inspector-style listings (limit 50, filters on step, task,
difficulty, version, reward, advantage, length, a component; sorted by a random column or
component) twice: as HTTP requests the page makes (with the matching-row count), and as
direct `RolloutStore.query` + `count` calls in this process. Prints p50/p95/max of both
and their ratio (the server's own overhead: HTTP, validation, JSON), the latency of the
other views the page polls (store info, steps, group, curves), and the server process's
RSS after start-up and after the requests (target: listing p95 <= 200 ms).

Usage: python bench/bench_server.py [--rows 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_rollout_store import make_rows, pct, random_query  # noqa: E402

from rollout.store import COLUMNS, RolloutQuery, RolloutStore  # noqa: E402


def to_params(q: RolloutQuery) -> list[tuple[str, str]]:
    """The query string the web page sends for this listing."""
    p: list[tuple[str, str]] = []

    def rng(lo_key: str, hi_key: str, r) -> None:
        if r is None:
            return
        if r[0] is not None:
            p.append((lo_key, str(r[0])))
        if r[1] is not None:
            p.append((hi_key, str(r[1])))

    if q.step is not None:
        p.append(("step", str(q.step)))
    rng("step_min", "step_max", q.steps)
    for key in ("task", "difficulty", "policy_version"):
        v = getattr(q, key)
        if v is not None:
            p.extend((key, str(x)) for x in (v if isinstance(v, list) else [v]))
    rng("reward_min", "reward_max", q.total_reward)
    rng("advantage_min", "advantage_max", q.advantage)
    rng("length_min", "length_max", q.length)
    for name, (lo, hi) in q.components.items():
        p.append(("comp", f"{name}:{'' if lo is None else lo}:{'' if hi is None else hi}"))
    p.append(("sort", q.sort_by if q.sort_by in COLUMNS else f"components.{q.sort_by}"))
    p += [("desc", str(q.descending).lower()), ("limit", str(q.limit)), ("offset", str(q.offset))]
    return p


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    groups, group_size = 25, 8
    n_steps = max(1, args.rows // (groups * group_size))
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        with RolloutStore.in_dir(run / "rl") as store:
            for step in range(n_steps):
                store.append(make_rows(step, groups, group_size, rng))
            n = store.count()
        print(f"store: {n} rollouts over {n_steps} steps, built in {time.perf_counter() - t0:.0f} s")

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-c", "from vlrl.cli import main; main()", "serve", "--run", str(run), "--port", str(port)],
            stdout=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=30) as client:
                deadline = time.time() + 30
                while True:
                    try:
                        client.get("/api/run").raise_for_status()
                        break
                    except httpx.TransportError:
                        if time.time() > deadline:
                            raise
                        time.sleep(0.1)
                print(f"server RSS after start-up {rss_mb(server.pid):.0f} MiB")

                qrng = random.Random(args.seed + 1)
                queries = [random_query(qrng, n_steps) for _ in range(args.queries)]
                http_ms, direct_ms, http_nocount_ms = [], [], []
                for q in queries:
                    r, ms = timed(client.get, "/api/stages/rl/rollouts", params=to_params(q))
                    r.raise_for_status()
                    http_ms.append(ms)
                for q in queries:
                    params = [(k, v) for k, v in to_params(q)] + [("count", "false")]
                    r, ms = timed(client.get, "/api/stages/rl/rollouts", params=params)
                    r.raise_for_status()
                    http_nocount_ms.append(ms)
                with RolloutStore.in_dir(run / "rl", readonly=True) as reader:
                    for q in queries:
                        t = time.perf_counter()
                        reader.query(q)
                        reader.count(q.model_copy(update={"limit": 1, "offset": 0}))
                        direct_ms.append((time.perf_counter() - t) * 1000)

                def line(label: str, xs: list[float]) -> str:
                    return f"{label}: p50 {pct(xs, 50):.1f} ms  p95 {pct(xs, 95):.1f} ms  max {max(xs):.1f} ms"

                print(line(f"HTTP listing + count ({args.queries} random filtered, sorted, limit 50)", http_ms))
                print(line("HTTP listing without count", http_nocount_ms))
                print(line("direct store query + count (same queries, this process)", direct_ms))
                print(f"HTTP / direct: p50 x{pct(http_ms, 50) / pct(direct_ms, 50):.2f}  p95 x{pct(http_ms, 95) / pct(direct_ms, 95):.2f}")
                print(f"target listing p95 <= 200 ms: {'met' if pct(http_ms, 95) <= 200 else 'NOT met'}")

                views = {
                    "store info": "/api/stages/rl/store",
                    "steps (summaries)": "/api/stages/rl/steps",
                    "group view": f"/api/stages/rl/groups/{n_steps // 2}-3",
                    "curves (first call)": "/api/stages/rl/curves",
                    "curves (cached)": "/api/stages/rl/curves",
                }
                for label, path in views.items():
                    r, ms = timed(client.get, path)
                    r.raise_for_status()
                    print(f"{label}: {ms:.0f} ms ({len(r.content) / 1024:.0f} KiB)")
                print(f"server RSS after the requests {rss_mb(server.pid):.0f} MiB")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()

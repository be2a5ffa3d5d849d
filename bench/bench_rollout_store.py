"""Rollout store: filtered, sorted listing latency over a store of 100,000 rollouts.

Builds a store like an RL run's (500 steps x 25 groups x 8 samples, 8 tasks, 5 reward
components, responses of 200-1,500 characters) in a temp dir, one `append` per step, then
runs random inspector-style listings (limit 50): filters drawn from step / step range,
task, difficulty, policy version, total reward, advantage, length and a reward component;
sorted by a random column or component. Prints p50/p95/max latency (target: p95 <= 200 ms),
the cost of count(), groups(step) and step_summaries(), the append rate, the file size and
the process RSS (after the build, and for the reader alone once the writer has closed).

The planner statistics are as a live run leaves them (no ANALYZE), since the inspector
reads stores that training is still writing; `--analyze` measures after ANALYZE too.

Usage: python bench/bench_rollout_store.py [--rows 100000] [--queries 200] [--analyze]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from rollout.store import RolloutQuery, RolloutRow, RolloutStatus, RolloutStore

TASKS = ["read_digits", "count_shapes", "arith", "color_name", "compare", "chart_qa", "ocr_line", "chat"]
COMPONENTS = ["accuracy", "format", "length", "diversity", "perception"]
SORTS = ["total_reward", "advantage", "length", "step", "policy_version", "difficulty", "id", *COMPONENTS]
# Range filters a user would type, drawn inside each component's own range.
COMPONENT_FILTERS = {
    "accuracy": lambda rng: rng.choice([(1.0, None), (None, 0.0)]),
    "format": lambda rng: rng.choice([(1.0, None), (None, 0.0)]),
    "length": lambda rng: (rng.uniform(-0.3, 0.0), None),
    "diversity": lambda rng: (rng.uniform(0.0, 0.2), None),
    "perception": lambda rng: (None, rng.uniform(0.0, 0.1)),
}
WORDS = "the a shape digit colour red blue three seven count answer because so therefore box".split()


def make_rows(step: int, groups: int, group_size: int, rng: random.Random) -> list[RolloutRow]:
    rows = []
    for g in range(groups):
        task = rng.choice(TASKS)
        difficulty = rng.randint(1, 5)
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {step}-{g}: {' '.join(rng.choices(WORDS, k=20))}?"}]}]
        for i in range(group_size):
            n_chars = rng.randint(200, 1500)
            text = " ".join(rng.choices(WORDS, k=n_chars // 5))[:n_chars]
            comps = {
                "accuracy": float(rng.random() < 0.4),
                "format": float(rng.random() < 0.9),
                "length": -rng.random() * 0.3,
                "diversity": rng.random() * 0.2,
                "perception": rng.random() * 0.1 if rng.random() < 0.7 else None,
            }
            total = sum(v for v in comps.values() if v is not None)
            truncated = rng.random() < 0.05
            rows.append(
                RolloutRow(
                    run="bench",
                    step=step,
                    policy_version=step,
                    group_id=f"{step}-{g}",
                    sample_index=i,
                    record_id=f"rec{rng.randint(0, 20_000)}",
                    task=task,
                    difficulty=difficulty,
                    prompt=prompt,
                    images=[f"images/{step}-{g}.png"],
                    answer=str(rng.randint(0, 99)),
                    response=text,
                    response_tokens=n_chars // 4,
                    finish_reason="length" if truncated else "stop",
                    status=RolloutStatus.truncated if truncated else RolloutStatus.ok,
                    components=comps,
                    total_reward=total,
                    advantage=rng.gauss(0.0, 1.0),
                )
            )
    return rows


def random_query(rng: random.Random, n_steps: int) -> RolloutQuery:
    f: dict = {}
    if rng.random() < 0.3:
        f["step"] = rng.randrange(n_steps)
    elif rng.random() < 0.4:
        lo = rng.randrange(n_steps)
        f["steps"] = (lo, min(n_steps - 1, lo + rng.randint(5, 100)))
    if rng.random() < 0.5:
        f["task"] = rng.choice(TASKS)
    if rng.random() < 0.3:
        f["difficulty"] = rng.randint(1, 5)
    if rng.random() < 0.1:
        f["policy_version"] = rng.randrange(n_steps)
    if rng.random() < 0.3:
        f["total_reward"] = (rng.uniform(0.0, 1.5), None)
    if rng.random() < 0.2:
        f["advantage"] = (None, rng.uniform(-1.0, 0.5))
    if rng.random() < 0.2:
        f["length"] = (rng.randint(50, 200), rng.randint(250, 400))
    if rng.random() < 0.3:
        name = rng.choice(COMPONENTS)
        f["components"] = {name: COMPONENT_FILTERS[name](rng)}
    return RolloutQuery(
        **f,
        sort_by=rng.choice(SORTS),
        descending=rng.random() < 0.6,
        limit=50,
        offset=rng.choice([0, 0, 0, 50, 100]),
    )


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t) * 1000


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def rss_mb() -> tuple[float, float]:
    cur = 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return cur, peak


def run_queries(store: RolloutStore, n: int, n_steps: int, seed: int) -> tuple[list[float], list[float], int]:
    rng = random.Random(seed)
    lat, count_lat, returned = [], [], 0
    for _ in range(n):
        q = random_query(rng, n_steps)
        rows, ms = timed(store.query, q)
        lat.append(ms)
        returned += len(rows)
        filters = q.model_dump(exclude={"sort_by", "descending", "limit", "offset"})
        _, cms = timed(store.count, RolloutQuery(**filters))
        count_lat.append(cms)
    return lat, count_lat, returned


def report(label: str, lat: list[float], count_lat: list[float], returned: int, n: int) -> None:
    print(
        f"{label}: listing p50 {pct(lat, 50):.1f} ms  p95 {pct(lat, 95):.1f} ms  max {max(lat):.1f} ms  "
        f"(mean rows/query {returned / n:.1f}); count() p50 {pct(count_lat, 50):.1f} ms  p95 {pct(count_lat, 95):.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--groups", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--analyze", action="store_true", help="also measure after ANALYZE")
    args = ap.parse_args()

    per_step = args.groups * args.group_size
    n_steps = max(1, args.rows // per_step)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = RolloutStore.in_dir(tmp)
        t0 = time.perf_counter()
        build_ms = 0.0
        for step in range(n_steps):
            rows = make_rows(step, args.groups, args.group_size, rng)
            _, ms = timed(store.append, rows)
            build_ms += ms
        total_s = time.perf_counter() - t0
        n = store.count()
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        print(f"store: {n} rollouts, {n_steps} steps, {size_mb:.0f} MiB on disk (with WAL)")
        print(f"append: {n / (build_ms / 1000):.0f} rows/s inside append ({build_ms / n_steps:.1f} ms per {per_step}-row batch); build incl. row generation {total_s:.1f} s")

        cur, _ = rss_mb()
        print(f"process RSS after the build {cur:.0f} MiB (writer's page cache included)")
        store.close()  # the writer is another process in a real run: measure the reader alone
        reader = RolloutStore.in_dir(tmp, readonly=True)  # as the inspection server opens it
        lat, count_lat, returned = run_queries(reader, args.queries, n_steps, args.seed + 1)
        report(f"{args.queries} random filtered+sorted listings (limit 50)", lat, count_lat, returned, args.queries)

        g_lat = [timed(reader.groups, s)[1] for s in random.Random(2).sample(range(n_steps), min(50, n_steps))]
        gv_lat = [timed(reader.group, f"{s}-3")[1] for s in random.Random(3).sample(range(n_steps), min(50, n_steps))]
        _, summ_ms = timed(reader.step_summaries)
        _, steps_ms = timed(reader.steps)
        print(
            f"groups(step) p50 {pct(g_lat, 50):.1f} ms  p95 {pct(g_lat, 95):.1f} ms; group(id) p50 {pct(gv_lat, 50):.1f} ms; "
            f"step_summaries() over {n_steps} steps {summ_ms:.0f} ms; steps() {steps_ms:.1f} ms"
        )
        cur, _ = rss_mb()
        print(f"process RSS after the listings {cur:.0f} MiB (reader)")
        if args.analyze:
            with RolloutStore.in_dir(tmp) as w:
                w.analyze()
            reader.close()
            reader = RolloutStore.in_dir(tmp, readonly=True)
            lat, count_lat, returned = run_queries(reader, args.queries, n_steps, args.seed + 1)
            report("after ANALYZE", lat, count_lat, returned, args.queries)
        _, peak = rss_mb()
        print(f"process peak RSS {peak:.0f} MiB")
        reader.close()


if __name__ == "__main__":
    main()

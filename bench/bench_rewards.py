"""Rule rewards: the process pool against a serial loop, and the hostile corpus's time.

    python bench/bench_rewards.py [--n 10000] [--workers 2]

Scores math_accuracy + format on N generated responses (plain numbers, LaTeX fractions,
roots and polynomials, right and wrong, with and without <think>), once in a serial loop
in this process (math-verify with its own signal timeouts, as a plain script would run
it) and once through a warm RewardStack pool, alternating over a few slices. Prints samples/s of both and the ratio,
then the wall time of the hostile corpus (tests/rewards/rewards_hostile_corpus.py),
which its per-call timeouts bound.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards import RewardSample, RewardStack  # noqa: E402
from rewards.rules import format_reward, math_accuracy, warmup  # noqa: E402


def make_samples(n: int, seed: int = 0) -> list[RewardSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        a, b = rng.randint(1, 999), rng.randint(2, 97)
        if kind < 0.4:  # plain integers
            answer, right = str(a * b), str(a * b)
        elif kind < 0.7:  # a fraction answered as a decimal or an equivalent fraction
            answer, right = rf"\frac{{{a}}}{{{b}}}", (f"{a / b:.6f}" if rng.random() < 0.5 else rf"\frac{{{2 * a}}}{{{2 * b}}}")
        elif kind < 0.85:  # roots
            answer, right = rf"{a}\sqrt{{{b}}}", rf"\sqrt{{{a * a * b}}}"
        else:  # polynomials
            answer, right = rf"x^{{2}} + {a}x + {b}", rf"{b} + {a}x + x^2"
        pred = right if rng.random() < 0.6 else rf"{a + 1}"
        body = f"Let me compute step {i}. " * rng.randint(1, 20)
        think = f"<think>{body}</think> " if rng.random() < 0.7 else body
        resp = think + (rf"The answer is \boxed{{{pred}}}." if rng.random() < 0.9 else f"The answer is {pred}.")
        out.append(RewardSample(response=resp, answer=answer, task="arith", group_id=f"p{i // 8}"))
    return out


def serial(samples: list[RewardSample]) -> list[tuple[float, float]]:
    return [(math_accuracy(s), format_reward(s)) for s in samples]


def proc_cpu(pids: list[int]) -> float | None:
    """CPU seconds used so far by these processes (Linux /proc), None elsewhere."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return total
    except (OSError, ValueError, IndexError):
        return None


def load_hostile():
    path = ROOT / "tests" / "rewards" / "rewards_hostile_corpus.py"
    spec = importlib.util.spec_from_file_location("rewards_hostile_corpus", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="alternate pool and serial over this many slices")
    ap.add_argument("--hostile-timeout", type=float, default=1.0)
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cores: {os.cpu_count()}  load average (1 min): {load:.2f}  responses: {args.n}  pool workers: {args.workers}")
    samples = make_samples(args.n)

    cfg = {"components": {"math_accuracy": "math_accuracy", "format": "format"}, "workers": args.workers, "timeout": 10.0}
    # pool and serial alternate over `rounds` slices, so a change in the machine's load
    # during the run falls on both sides alike
    step = -(-len(samples) // args.rounds)
    slices = [samples[i : i + step] for i in range(0, len(samples), step)]
    results, ref, t_pool, t_serial, cpu_parent = [], [], 0.0, 0.0, 0.0
    warmup()
    with RewardStack.from_config(cfg) as stack:
        t = time.perf_counter()
        stack.start()
        print(f"pool start (spawn + imports): {time.perf_counter() - t:.2f}s")
        pids = stack._pool.pids
        cpu_workers0 = proc_cpu(pids)
        cpu_serial = 0.0
        for part in slices:
            t, cpu = time.perf_counter(), time.process_time()
            results += stack.score(part)
            t_pool += time.perf_counter() - t
            cpu_parent += time.process_time() - cpu
            t, cpu = time.perf_counter(), time.process_time()
            ref += serial(part)
            t_serial += time.perf_counter() - t
            cpu_serial += time.process_time() - cpu
        cpu_workers1 = proc_cpu(pids)
        stats = stack.pool_stats

    agree = sum(r.components["math_accuracy"] == m and r.components["format"] == f for r, (m, f) in zip(results, ref))
    fails = sum(1 for r in results if r.failures)
    print(f"serial loop : {args.n / t_serial:8.1f} samples/s  ({t_serial:.2f}s, {t_serial / args.n * 1e3:.2f} ms/sample)")
    print(f"pool        : {args.n / t_pool:8.1f} samples/s  ({t_pool:.2f}s; {stats.calls} calls, {fails} failed; parent CPU {cpu_parent:.2f}s)")
    print(f"ratio pool / serial: {t_serial / t_pool:.2f}x   (target >= 1.6x on 2 cores; other load on the machine lowers it)")
    if cpu_workers0 is not None and cpu_workers1 is not None:
        cpu_pool = cpu_workers1 - cpu_workers0
        print(
            f"CPU time: serial {cpu_serial:.2f}s, pool workers {cpu_pool:.2f}s + parent {cpu_parent:.2f}s "
            f"(pool overhead {(cpu_pool + cpu_parent) / cpu_serial - 1:+.1%}); ratio with {args.workers} idle cores "
            f"at most about {args.workers * cpu_serial / (cpu_pool + cpu_parent):.2f}x"
        )
    print(f"agreement with the serial loop: {agree}/{args.n}   accuracy: {sum(m for m, _ in ref) / args.n:.3f}")

    H = load_hostile()
    hostile = H.samples()
    with RewardStack.from_config(H.stack_config(timeout=args.hostile_timeout, workers=args.workers)) as stack:
        stack.start()
        t = time.perf_counter()
        res = stack.score(hostile)
        t_h = time.perf_counter() - t
        st = stack.pool_stats
    n_fail = sum(1 for r in res if r.failures)
    n_hang = sum(1 for c in H.CASES if c[3] == "timeout")
    print(
        f"hostile corpus: {len(hostile)} cases in {t_h:.2f}s ({n_fail} with a reported failure, {n_hang} hang cases at "
        f"{args.hostile_timeout:g}s timeout; pool: {st.timeouts} timeouts, {st.crashes} crashes, {st.restarts} restarts)"
    )


if __name__ == "__main__":
    main()

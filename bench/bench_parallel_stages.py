"""Two stages at once against one after the other: the case for `parallel:` in a recipe
(vlrl/stage_pool.py), and what its way of sharing the cores costs, side by side in one run.

Each worker is its own process running the SFT stage's packed optimizer steps (sft/feed.py,
PackedForward, sft.trainer.optimizer_step) on the same checkpoint and data, as two SFT stages
of a recipe do. Per round, four arms:
  sequential   one worker with all threads, twice in turn (what `parallel: 1` does);
  split        two workers at once with threads / 2 each (how the pool shared the cores
               before: fast, but a training step's floats depend on the thread count on
               some CPUs, so a stage's numbers depended on what ran beside it);
  full         two workers at once with all threads each, OpenMP's default (spinning) wait;
  full+passive two at once with all threads each, OMP_WAIT_POLICY=PASSIVE (what the pool
               does now: every stage computes exactly as it would alone);
and a lone worker with all threads and passive waiting, against `sequential`'s first half,
for what passive waiting costs a stage that runs alone.
Model loading is outside the timed part (workers wait for a common start time). The median
over rounds of sequential seconds / each arm's seconds is printed; above 1, that way of
running two stages at once finishes sooner than one after the other.

Usage: python bench/bench_parallel_stages.py [--data runs/tiny/data] [--model runs/tiny/pretrain/checkpoint]  (after `make demo`)
                                             [--steps 60] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(args) -> None:
    import torch

    from sft.curriculum import RecordStream, build_plan
    from sft.feed import Feed
    from sft.trainer import make_optimizer, optimizer_step, trained_components
    from vlrl.data.images import RecordDataset
    from vlrl.data.io import split_path
    from vlrl.device import resolve_device
    from vlrl.model.loading import component_of, load_model, load_processor, set_trainable
    from vlrl.model.packing import PackedForward
    from vlrl.recipe_sft import PackingSpec, SftStage

    spec = resolve_device("cpu")
    spec.configure(threads=args.threads)
    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    processor = load_processor(args.model)
    dataset = RecordDataset(split_path(args.data, "train"))
    cfg = SftStage.model_validate({"from": args.model, "data": args.data, "phases": [{"name": "all", "steps": 1}],
                                   "optim": {"lr_mult": {"vision": 0.0, "projector": 0.0}}})
    set_trainable(model, trained_components(cfg.optim, "bench"))
    forward = PackedForward(model)
    optimizer = make_optimizer(model.named_parameters(), cfg.optim, component_of)
    feed = Feed(dataset, processor, RecordStream(build_plan(dataset.records, cfg, "bench")[0], seed=args.seed, phase=0), batch_size=4,
                max_length=160, packing=PackingSpec(enabled=True, max_length=512), rope_index=model.model.get_rope_index)
    feed.micro_batch()  # first batch's image decoding and allocations out of the timed part
    time.sleep(max(0.0, args.go_at - time.time()))
    t0 = time.time()
    for _ in range(args.steps):
        optimizer_step(forward, optimizer, [feed.micro_batch()], lr=1e-4, grad_clip=1.0)
    print(json.dumps({"start": t0, "end": time.time()}), flush=True)


def spawn(args, threads: int, seed: int, go_at: float, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--seed", str(seed), "--go-at", str(go_at),
           "--steps", str(args.steps), "--data", args.data, "--model", args.model]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {}), "PYTHONPATH": os.getcwd()})


def timed(procs: list[subprocess.Popen]) -> float:
    spans = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed (exit {p.returncode})")
        spans.append(json.loads(out.strip().splitlines()[-1]))
    return max(s["end"] for s in spans) - min(s["start"] for s in spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/tiny/data")
    ap.add_argument("--model", default="runs/tiny/pretrain/checkpoint")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per worker")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the machine to share")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--go-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    half, passive = max(1, args.threads // 2), {"OMP_WAIT_POLICY": "PASSIVE"}
    ratios: dict[str, list[float]] = {"split": [], "full": [], "full+passive": [], "lone passive": []}

    def together(threads: int, env: dict | None = None) -> float:
        """Seconds for two workers started at one moment (seeds 0 and 1)."""
        go = time.time() + 8
        return timed([spawn(args, threads, seed, go, env) for seed in (0, 1)])

    for r in range(args.rounds):
        first = timed([spawn(args, args.threads, 0, time.time() + 6)])
        seq = first + timed([spawn(args, args.threads, 1, time.time() + 6)])
        arms = {"split": together(half), "full": together(args.threads), "full+passive": together(args.threads, passive)}
        lone = timed([spawn(args, args.threads, 0, time.time() + 6, passive)])
        for arm, secs in arms.items():
            ratios[arm].append(seq / secs)
        ratios["lone passive"].append(first / lone)
        print(f"round {r + 1}: sequential (2 x {args.steps} steps, {args.threads} threads) {seq:.1f} s; two at once: "
              + ", ".join(f"{arm} {secs:.1f} s ({seq / secs:.2f})" for arm, secs in arms.items())
              + f"; alone, passive wait {lone:.1f} s vs {first:.1f} s ({first / lone:.2f})", flush=True)
    print(f"median of {args.rounds} rounds, sequential / two at once (above 1: sooner): "
          f"split ({half} thread(s) each) {statistics.median(ratios['split']):.2f}, "
          f"full ({args.threads} each, spinning wait) {statistics.median(ratios['full']):.2f}, "
          f"full+passive ({args.threads} each, OMP_WAIT_POLICY=PASSIVE) {statistics.median(ratios['full+passive']):.2f}; "
          f"a lone stage, active / passive wait: {statistics.median(ratios['lone passive']):.2f} (below 1: passive is slower alone)")


if __name__ == "__main__":
    main()

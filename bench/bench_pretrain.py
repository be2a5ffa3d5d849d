"""Pretraining throughput: the stage's trainer against a bare loop, side by side.

Prints, in one run on this machine:
- tokens/s of `sft.trainer.train_steps` (schedule, clipping, logging to JSONL and
  TensorBoard, checkpoints) and of a bare forward/backward/step loop over the very
  same pre-collated batches, and their ratio (target: trainer costs <= 10% more);
- tokens/s of the trainer fed by the stage's real data path (images decoded and
  collated per step), for what a user sees;
- achieved FLOP/s (counted by torch's FlopCounterMode on one step) as a fraction
  of a measured float32 matmul peak.
Rounds alternate (bare, trainer, bare, trainer, ...) and the median is reported,
since this machine is noisy.

Usage: python bench/bench_pretrain.py [--steps 30] [--rounds 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sft.pretrain import phase_pool
from sft.sampler import BatchSampler
from sft.state import TrainerState, save_state
from sft.trainer import LoopHooks, make_optimizer, train_steps
from vlrl.data.images import RecordDataset
from vlrl.data.io import split_path
from vlrl.data.synth import corpus_texts, make_dataset
from vlrl.device import resolve_device
from vlrl.model.batching import collate_for_training
from vlrl.model.loading import load_model, load_processor
from vlrl.model.tiny import init_tiny_model
from vlrl.recipe import DataSelect, OptimSpec
from vlrl.tracking import Tracker


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def bare_loop(model, opt, batches) -> float:
    t = time.perf_counter()
    for b in batches:
        out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def trainer_loop(model, opt, batches, spec, out_dir: Path, state_every: int) -> float:
    tracker = Tracker(out_dir, run_name="bench", stage="bench")
    it = iter([[b] for b in batches])

    def checkpoint(done: int) -> None:
        save_state(out_dir / "state", model, opt, TrainerState(step=done))

    t = time.perf_counter()
    train_steps(model, opt, it, start=0, total=len(batches), spec=spec, device=torch.device("cpu"),
                hooks=LoopHooks(lambda s, m: tracker.log(m, s), checkpoint, log_every=10, checkpoint_every=state_every))
    dt = time.perf_counter() - t
    tracker.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--checkpoint-every", type=int, default=100, help="as in recipes/tiny.yaml (50-100)")
    args = ap.parse_args()

    resolve_device("cpu").configure()
    work = Path(tempfile.mkdtemp(prefix="vlrl-bench-"))
    make_dataset(work / "data", seed=0, n=600, n_eval=10)
    init_tiny_model(work / "model", corpus_texts(0, 5000), preset="tiny", seed=0)
    model = load_model(work / "model", device="cpu")
    processor = load_processor(work / "model")
    ds = RecordDataset(split_path(work / "data", "train"))
    pool, _ = phase_pool(ds.records, DataSelect())
    sampler = BatchSampler(len(pool), args.batch_size, seed=0)

    def collate(k: int):
        return collate_for_training([ds[pool[j]] for j in sampler.batch(k)], processor, loss_on="assistant", max_length=160)

    t0 = time.perf_counter()
    batches = [collate(k) for k in range(args.steps)]
    collate_s = (time.perf_counter() - t0) / args.steps
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    spec = OptimSpec(lr=1e-3, warmup_steps=5)

    with FlopCounterMode(display=False) as fc:
        out = model(**batches[0])
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    flops_per_step = fc.get_total_flops()
    peak = matmul_peak()

    bare, trainer = [], []
    for r in range(args.rounds):
        opt = make_optimizer(model.named_parameters(), spec)
        bare.append(bare_loop(model, opt, batches))
        opt = make_optimizer(model.named_parameters(), spec)
        trainer.append(trainer_loop(model, opt, batches, spec, work / f"trainer{r}", args.checkpoint_every))
    # The real data path: the same steps, collating from disk inside the loop.
    opt = make_optimizer(model.named_parameters(), spec)
    tracker = Tracker(work / "full", run_name="bench")
    it = ([collate(k)] for k in range(args.steps))
    t = time.perf_counter()
    train_steps(model, opt, it, start=0, total=args.steps, spec=spec, device=torch.device("cpu"),
                hooks=LoopHooks(lambda s, m: tracker.log(m, s), lambda d: None, 10, 10**9))
    full = time.perf_counter() - t
    tracker.close()

    b, tr = statistics.median(bare), statistics.median(trainer)
    print(f"threads={torch.get_num_threads()} steps={args.steps} batch={args.batch_size} tokens/step={tokens / args.steps:.0f}")
    print(f"bare loop        : {tokens / b:9.0f} tokens/s  ({b / args.steps * 1000:.1f} ms/step)  rounds={['%.2f' % x for x in bare]}")
    print(f"trainer          : {tokens / tr:9.0f} tokens/s  ({tr / args.steps * 1000:.1f} ms/step)  rounds={['%.2f' % x for x in trainer]}")
    print(f"trainer / bare time ratio: {tr / b:.3f}  (target <= 1.10)")
    print(f"trainer + data path (collate per step): {tokens / full:9.0f} tokens/s, ratio to bare {full / b:.3f}; collate alone {collate_s * 1000:.1f} ms/step")
    achieved = flops_per_step * args.steps / tr
    print(f"FLOP/step {flops_per_step / 1e9:.2f} GFLOP; achieved {achieved / 1e9:.2f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s; fraction {achieved / peak:.3f}")


if __name__ == "__main__":
    main()

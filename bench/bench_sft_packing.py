"""SFT throughput with and without online packing, side by side.

Both modes run the SFT stage's own data path (sft/feed.py: images decoded, records
collated or packed per step) and optimizer step (sft.trainer.optimizer_step through
PackedForward) on the same checkpoint and the same record stream. Throughput is
real (non-pad) tokens per second of wall time, data preparation included. Rounds
alternate (plain, packed, plain, packed, ...) and the median of the per-round
ratios is reported, since this machine is shared and noisy. Target: packed / plain >= 1.5.
"packed" uses the attention the SFT stage uses on this device (PackedForward's default:
record by record on CPU, vlrl.model.packed_attention; transformers' dense block-diagonal
mask on accelerators); a third mode runs the same packed batches through the other one,
to show what the choice is worth (docs/backends.md has the H200 numbers).

Usage: python bench/bench_sft_packing.py [--data runs/tiny/data] [--model runs/tiny/pretrain/checkpoint]  (after `make demo`)
                                         [--steps 8] [--rounds 3] [--batch-size 16] [--rows 4] [--pack-length 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sft.curriculum import RecordStream, build_plan
from sft.feed import Feed
from sft.trainer import make_optimizer, optimizer_step, to_device, trained_components
from vlrl.data.images import RecordDataset
from vlrl.data.io import split_path
from vlrl.device import DeviceSpec, resolve_device
from vlrl.model.loading import component_of, load_model, load_processor, set_trainable
from vlrl.model.packing import PackedForward
from vlrl.recipe_sft import PackingSpec, SftStage


def run(feed: Feed, forward, optimizer, steps: int, spec: DeviceSpec) -> tuple[float, float]:
    """(real tokens per second, packing efficiency) over `steps` optimizer steps."""
    tokens, t0 = 0, time.perf_counter()
    for _ in range(steps):
        mb = feed.micro_batch()
        tokens += int(mb["attention_mask"].sum())
        optimizer_step(forward, optimizer, [to_device(mb, spec.torch_device)], lr=1e-4, grad_clip=1.0)
    spec.synchronize()  # the last step's kernels belong to this round's time
    return tokens / (time.perf_counter() - t0), feed.stats.window()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/tiny/data")
    ap.add_argument("--model", default="runs/tiny/pretrain/checkpoint")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="records per unpacked batch")
    ap.add_argument("--rows", type=int, default=4, help="packed rows per batch")
    ap.add_argument("--pack-length", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=160, help="per-record token limit")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, npu or auto")
    args = ap.parse_args()
    spec = resolve_device(args.device)
    spec.configure(threads=args.threads)

    torch.manual_seed(0)
    model = load_model(args.model, device=spec.kind)
    processor = load_processor(args.model)
    dataset = RecordDataset(split_path(args.data, "train"))
    # The tiny recipe's SFT settings: replay, and the tower frozen (lr_mult 0 -> no gradients, as the stage does).
    cfg = SftStage.model_validate({"from": args.model, "data": args.data, "phases": [{"name": "all", "steps": 1}], "replay": {"general": 0.1, "perception": 0.3},
                                   "optim": {"lr_mult": {"vision": 0.0, "projector": 0.0}}})
    set_trainable(model, trained_components(cfg.optim, "bench"))
    plan = build_plan(dataset.records, cfg, "bench")[0]
    forward = PackedForward(model)  # the stage's choice on this device
    other = PackedForward(model, by_record=not forward.by_record)
    other_name = "by-record" if other.by_record else "dense"
    optimizer = make_optimizer(model.named_parameters(), cfg.optim, component_of)
    plain = Feed(dataset, processor, RecordStream(plan, seed=0, phase=0), batch_size=args.batch_size, max_length=args.max_length,
                 packing=PackingSpec(enabled=False))
    packed = Feed(dataset, processor, RecordStream(plan, seed=0, phase=0), batch_size=args.rows, max_length=args.max_length,
                  packing=PackingSpec(enabled=True, max_length=args.pack_length), rope_index=model.model.get_rope_index)
    model.train()
    run(plain, forward, optimizer, 2, spec)  # warm-up both paths
    run(packed, forward, optimizer, 2, spec)
    modes = [("plain", plain, forward), ("packed", packed, forward), (other_name, packed, other)]
    res: dict[str, list[float]] = {name: [] for name, _, _ in modes}
    eff: dict[str, list[float]] = {name: [] for name, _, _ in modes}
    for r in range(args.rounds):
        for name, feed, fwd in modes:
            tps, e = run(feed, fwd, optimizer, args.steps, spec)
            res[name].append(tps)
            eff[name].append(e)
        print(f"round {r + 1}: " + ", ".join(f"{n} {res[n][-1]:,.0f} tok/s" for n in res)
              + f", ratio {res['packed'][-1] / res['plain'][-1]:.2f}x")
    p, q = statistics.median(res["plain"]), statistics.median(res["packed"])
    print(f"device {spec.kind}, threads {torch.get_num_threads()}; plain: {args.batch_size} records/batch padded to the longest; "
          f"packed: {args.rows} rows x {args.pack_length} tokens")
    print(f"plain : {p:,.0f} real tok/s (non-pad share {statistics.mean(eff['plain']):.2f})")
    mine = "by-record" if forward.by_record else "dense"
    print(f"packed: {q:,.0f} real tok/s (non-pad share {statistics.mean(eff['packed']):.2f}; {mine} attention, this device's default)")
    dr = [b / a for a, b in zip(res["plain"], res[other_name])]
    print(f"packed with {other_name} attention instead: {statistics.median(res[other_name]):,.0f} "
          f"real tok/s, ratio to plain {statistics.median(dr):.2f}x (reference)")
    ratios = [b / a for a, b in zip(res["plain"], res["packed"])]
    print(f"ratio packed/plain: {statistics.median(ratios):.2f}x median of per-round ratios "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; ratio of medians {q / p:.2f}x; target >= 1.5x)")


if __name__ == "__main__":
    main()

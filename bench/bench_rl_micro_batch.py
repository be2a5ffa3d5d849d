"""Seconds of one RL policy update by `micro_batch_size`, side by side in one process (CPU).

Why: the trainer cuts a step's rows, sorted by length, into micro-batches (default 16
rows). Smaller ones waste less padding, but each is a forward and a backward with its
own fixed cost, and the image dedup (the tower run once per distinct image) only works
inside one micro-batch: length-sorting scatters a group's rows, which share one image,
over several. Which size is fastest depends on the group size and lengths, so this
measures it on the batch an RL step really trains on.

The batch: `--groups` prompts (reasoning, difficulty 1-3, the RL prompt file), each with
`--n` responses sampled from the checkpoint plus the record's reference solution (the
rows guidance adds), as recipes/tiny-guided.yaml trains. Every size updates a fresh copy
of the same weights on the same batch; sizes run in turns, `--repeats` rounds, and the
median per size is printed with its ratio to the default (16). The update is the same
loss whatever the size (losses are normalised over the mini-batch), so only speed moves.

Usage: python bench/bench_rl_micro_batch.py --model runs/tiny/sft/checkpoint
       --data runs/tiny/rl_prompts [--groups 54] [--n 2] [--sizes 16,32,64,0] [--repeats 3]
(0 = the whole batch in one forward)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.batch import build_policy_batch  # noqa: E402
from rlhf.guidance import end_of_turn_id, reference_completion  # noqa: E402
from rlhf.workers import PolicyTrainer  # noqa: E402
from rollout.engine import GenerationRequest, SamplingParams  # noqa: E402
from rollout.hf_engine import HFEngine  # noqa: E402
from vlrl.data.images import RecordDataset  # noqa: E402
from vlrl.data.io import split_path  # noqa: E402
from vlrl.data.synth import select_indices  # noqa: E402
from vlrl.model.loading import load_model, load_processor  # noqa: E402
from vlrl.recipe_base import OptimSpec  # noqa: E402
from vlrl.rl_config import RLAlgoConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a policy checkpoint (e.g. runs/tiny/sft/checkpoint)")
    ap.add_argument("--data", required=True, help="a data stage's folder or train file (e.g. runs/tiny/rl_prompts)")
    ap.add_argument("--groups", type=int, default=54)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--sizes", default="16,32,64,0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    ds = RecordDataset(split_path(data, "train") if data.is_dir() else data)
    idx = select_indices(ds.records, families=["reasoning"], difficulty=(1, 3))[: args.groups]
    processor = load_processor(args.model)
    model = load_model(args.model, device="cpu")
    requests = [GenerationRequest.from_sample(ds[i], request_id=str(i)) for i in idx]
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=64, seed=0)
    sampled = HFEngine(model, processor).generate(requests, params)
    del model
    stop = end_of_turn_id(processor)  # what the RL stage ends its references with
    prompt_of, rows = [], []
    for k, (i, comps) in enumerate(zip(idx, sampled)):
        ref = reference_completion(
            ds.records[i].target_text(), tokenizer=processor.tokenizer, stop_id=stop, request_id=str(i), sample_index=args.n,
            prompt_tokens=comps[0].prompt_tokens, policy_version=0,
        )
        for c in [*comps, ref]:
            prompt_of.append(k)
            rows.append(c)
    batch = build_policy_batch(requests, prompt_of, rows, processor)
    adv = torch.randn(batch.rows, 1).expand(-1, batch.response_width).contiguous() * batch.response_mask  # (B, R)
    algo = RLAlgoConfig.model_validate({"loss": {"clip_ratio_high": 0.28}})
    optim = OptimSpec(lr=1e-4, weight_decay=0.0, warmup_steps=0, schedule="constant", lr_mult={"vision": 3.0, "projector": 3.0})
    sizes = [int(s) for s in args.sizes.split(",")]
    trainers = {s: PolicyTrainer(args.model, device="cpu", algo=algo, optim=optim, trainable="all", micro_batch_size=s or None) for s in sizes}
    real = int(batch.attention_mask.sum())
    print(f"{batch.rows} rows ({len(requests)} prompts x {args.n} samples + a reference each), {real} tokens, "
          f"padded width {batch.input_ids.shape[1]} ({batch.rows * batch.input_ids.shape[1]} slots)")
    secs: dict[int, list[float]] = {s: [] for s in sizes}
    for r in range(args.repeats + 1):  # round 0 warms up (allocations, first-call paths)
        for s in sizes:
            t0 = time.perf_counter()
            trainers[s].update(batch, adv, ref_logprobs=None, kl_coef=0.0, lr=1e-4, step=r)
            if r:
                secs[s].append(time.perf_counter() - t0)
    base = statistics.median(secs[sizes[0]])
    for s in sizes:
        med = statistics.median(secs[s])
        print(f"micro_batch_size {s or 'whole batch':>11}: {med:.3f} s per update (median of {args.repeats}), {med / base:.2f}x of {sizes[0]}")


if __name__ == "__main__":
    main()

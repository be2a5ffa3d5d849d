"""One RL step of ours against TRL's GRPOTrainer, side by side in one process tree (CPU).

Both sides get the same tiny model (the same saved weights), the same prompts (the
train split's text-family records: TRL's GRPOTrainer does not take our Qwen2.5-VL image
prompts on CPU without a VLM processor path we could not make equal, so both run the
text-only prompts), the same group size, prompts per step, response length cap and
temperature, the same learning rate and loss aggregation (token-mean = TRL's "dapo"),
no KL (beta 0, no reference model) and one optimizer step per RL step, and the same
reward (our reward stack, in-process, wrapped as a TRL reward function for TRL).

Printed: seconds per step of each (median over the steps after a warm-up step, which
both sides take), their ratio (target <= 0.5), and rollout tokens/s of our engine
against `model.generate` on the same prompts (bench/bench_rollout.py's measurement,
reused; target >= 3x).

Ours runs in the default placement (colocate: the rollout worker is a Ray actor, the
trainer in this process); start-up (Ray, actors, model loads) is not in the per-step time
of either side.

Measured results: docs/rl-stage.md ("Speed"). The tiny recipe's setting: --prompts 16 --n 8 --max-tokens 48.

Usage: python bench/bench_rl_trl.py [--steps 4] [--prompts 8] [--n 4] [--max-tokens 32]
       [--threads 1] [--train-steps 60] [--model DIR] [--placement colocate]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import generate_baseline, quick_train  # noqa: E402

from rewards.api import RewardSample  # noqa: E402
from rewards.stack import RewardStack, RewardStackConfig  # noqa: E402
from rollout.engine import GenerationRequest, SamplingParams  # noqa: E402
from rollout.hf_engine import HFEngine  # noqa: E402
from vlrl.data.images import RecordDataset  # noqa: E402
from vlrl.data.io import split_path  # noqa: E402
from vlrl.data.synth import corpus_texts, make_dataset, select_indices  # noqa: E402
from vlrl.device import resolve_device  # noqa: E402
from vlrl.model.loading import load_model, load_processor  # noqa: E402
from vlrl.model.tiny import build_tiny_model  # noqa: E402



def short_answer(sample: RewardSample) -> float:
    """A dense reward (shorter is better) so that every group has a spread and both sides
    run a real update every step: with the tiny model's sparse accuracy, most groups would
    be all-zero, and our controller skips updates without a learning signal (TRL does not)."""
    return 1.0 - min(1.0, (sample.response_length or 0) / 64.0)


# The same stack for both sides, in-process: format + the dense term, applied to every prompt.
REWARDS = {"workers": 0, "components": {"format": {"fn": "format"}, "short": {"fn": f"{Path(__file__).resolve()}:short_answer"}}}


def prepare(work: Path, args) -> tuple[Path, Path]:
    data = work / "data"
    make_dataset(data, seed=0, n=400, n_eval=32)
    if args.model is not None:
        return data, args.model
    model, processor = build_tiny_model(corpus_texts(0, 3000), preset=args.preset, seed=0)
    train = RecordDataset(split_path(data, "train"))
    quick_train(model, processor, [train[i] for i in range(len(train))], args.train_steps)
    ckpt = work / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    return data, ckpt


def ours(data: Path, ckpt: Path, work: Path, args) -> list[float]:
    from rich.console import Console

    from rlhf.stage import Controller
    from vlrl.recipe import validate_recipe
    from vlrl.runner import StageContext

    raw = {
        "name": "bench", "run_dir": str(work / "run"), "device": "cpu", "threads": args.threads, "tracking": {"tensorboard": False},
        "stages": {"rl": {
            "from": str(ckpt), "data": str(data), "steps": args.steps + 1, "placement": args.placement, "eval": False,
            "rollout": {"n": args.n, "prompts_per_step": args.prompts, "max_tokens": args.max_tokens, "temperature": 1.0},
            "curriculum": {"select": {"families": ["text"]}}, "rewards": REWARDS, "optim": {"lr": args.lr},
            "ray": {"num_cpus": 2},
        }},
    }
    recipe = validate_recipe(raw)
    ctx = StageContext(recipe, "rl", work / "run" / "rl", resolve_device("cpu"), Console(quiet=True), {"from": ckpt, "data": data})
    ctl = Controller(ctx, recipe.stages["rl"])
    times, parts = [], []
    try:
        for s in range(args.steps + 1):
            t = time.perf_counter()
            m = ctl.step(s)
            times.append(time.perf_counter() - t)
            parts.append({k: m[f"time/{k}"] for k in ("generate", "reward", "train", "sync", "prepare", "store")})
    finally:
        ctl.close()
    last = parts[-1]
    print("  ours, last step: " + ", ".join(f"{k} {v:.2f}s" for k, v in last.items()))
    return times[1:]


def trl(data: Path, ckpt: Path, work: Path, args) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    records = RecordDataset(split_path(data, "train")).records
    idx = select_indices(records, families=["text"])
    rows = [{"prompt": [{"role": "user", "content": records[i].prompt_messages()[-1].parts()[-1].text}], "answer": records[i].answer, "task": records[i].task} for i in idx]
    stack = RewardStack.from_config(RewardStackConfig.model_validate(REWARDS))

    def reward(prompts, completions, answer, task, **_):
        samples = [RewardSample(response=c[0]["content"] if isinstance(c, list) else c, answer=a, task=t, group_id=str(p)) for p, c, a, t in zip(prompts, completions, answer, task)]
        return [r.total for r in stack.score(samples)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)

    model = load_model(ckpt, device="cpu")
    processor = load_processor(ckpt)
    cfg = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, per_device_train_batch_size=args.prompts * args.n, gradient_accumulation_steps=1,
        num_generations=args.n, max_completion_length=args.max_tokens, temperature=1.0, top_k=0, top_p=1.0, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=0.0, num_iterations=1, loss_type="dapo",
        max_steps=args.steps + 1, logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0, seed=0,
    )
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=processor.tokenizer, callbacks=[clock])
    trainer.train()
    stack.close()
    return clock.times[1:]


def rollout_ratio(data: Path, ckpt: Path, args) -> tuple[float, float]:
    """bench_rollout's measurement on this bench's prompts: engine vs model.generate tokens/s."""
    model, processor = load_model(ckpt, device="cpu", trainable=False), load_processor(ckpt)
    train = RecordDataset(split_path(data, "train"))
    idx = select_indices(train.records, families=["text"])[: args.prompts]
    requests = [GenerationRequest.from_sample(train[i], request_id=str(i)) for i in idx]
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_tokens, seed=0)
    engine = HFEngine(model, processor)
    eng, gen = [], []
    for r in range(3):
        t = time.perf_counter()
        groups = engine.generate(requests, params.model_copy(update={"seed": r}))
        eng.append(sum(len(c.token_ids) for g in groups for c in g) / (time.perf_counter() - t))
        torch.manual_seed(r)
        dt, lengths = generate_baseline(model, processor, requests, params, engine.stop_token_ids)
        gen.append(sum(lengths) / dt)
    return statistics.median(eng), statistics.median(gen)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="timed steps (each side also runs one untimed warm-up step)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (the 2-core machine is shared)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--placement", default="colocate", choices=["colocate", "split", "inline"])
    args = ap.parse_args()

    resolve_device("cpu").configure(threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="vlrl-bench-rl-"))
    data, ckpt = prepare(work, args)
    print(f"model: {ckpt}; {args.prompts} text prompts x n={args.n}, max_tokens={args.max_tokens}, threads={args.threads}, placement={args.placement}")
    t_ours = ours(data, ckpt, work, args)
    t_trl = trl(data, ckpt, work, args)
    a, b = statistics.median(t_ours), statistics.median(t_trl)
    print(f"ours           : {a:7.2f} s/step  steps={['%.2f' % x for x in t_ours]}")
    print(f"TRL GRPOTrainer: {b:7.2f} s/step  steps={['%.2f' % x for x in t_trl]}")
    print(f"ratio ours / TRL: {a / b:.2f}  (target <= 0.5)")
    e, g = rollout_ratio(data, ckpt, args)
    print(f"rollout tokens/s: engine {e:.0f}, model.generate {g:.0f}, ratio {e / g:.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()

"""Rollout throughput: HFEngine against `model.generate` on the same prompts, same process.

Prints generated tokens/s of each and their ratio (target: engine >= 3x generate), and
the engine without its decode kernels (`fast_decode=False`) to show where the gain is.
Both sample n completions per prompt at the same temperature with no top-k/top-p and
the same end tokens; tokens are counted per sample up to and including its end token
(generate's padding after a row finishes is not counted). Rounds alternate (engine,
generate, engine, ...) and medians are reported, since this machine is shared.

By default the tiny model is freshly initialised and then trained for `--train-steps`
on synthetic train records, so that it ends its answers with <|im_end|> at varied
lengths as a policy does during RL (a random-init model runs every sample to
max_new_tokens, which hides what dropping finished rows is worth; `--train-steps 0`
measures that case). `--model DIR` benches a saved checkpoint instead.

Usage: python bench/bench_rollout.py [--prompts 32] [--n 4] [--max-new-tokens 48]
       [--rounds 3] [--preset tiny] [--train-steps 60] [--model DIR] [--threads N] [--device cpu|cuda|npu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from rollout.engine import GenerationRequest, SamplingParams
from rollout.hf_engine import HFEngine
from sft.trainer import to_device
from vlrl.data.images import RecordDataset
from vlrl.data.io import split_path
from vlrl.data.synth import corpus_texts, make_dataset
from vlrl.device import DeviceSpec, resolve_device
from vlrl.model.batching import collate_for_generation, collate_for_training
from vlrl.model.loading import load_model, load_processor
from vlrl.model.tiny import build_tiny_model


def quick_train(model, processor, samples, steps: int, batch_size: int = 16) -> None:
    """A few AdamW steps on train records: enough for the model to learn the answer
    format and the end token, so rollout lengths vary."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    device = next(model.parameters()).device
    for k in range(steps):
        chunk = [samples[(k * batch_size + j) % len(samples)] for j in range(batch_size)]
        loss = model(**to_device(collate_for_training(chunk, processor, max_length=192), device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def generate_baseline(model, processor, requests, params: SamplingParams, stop_ids, spec: DeviceSpec) -> tuple[float, list[int]]:
    """`model.generate` with num_return_sequences=n: seconds and per-sample lengths."""
    cfg = GenerationConfig(
        do_sample=True, temperature=params.temperature, top_k=0, top_p=1.0, num_return_sequences=params.n,
        max_new_tokens=params.max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=processor.tokenizer.pad_token_id,
        use_cache=True,
    )
    spec.synchronize()  # queued kernels would count against this call's time
    t = time.perf_counter()
    batch = to_device(collate_for_generation(requests, processor), spec.torch_device)
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=cfg)[:, batch["input_ids"].shape[1] :]  # (B*n, T_new)
    spec.synchronize()
    seconds = time.perf_counter() - t
    stops = set(stop_ids)
    lengths = []
    for row in out.tolist():
        end = next((i for i, tok in enumerate(row) if tok in stops), None)
        lengths.append(len(row) if end is None else end + 1)
    return seconds, lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--model", type=Path, default=None, help="a saved checkpoint directory instead of a fresh tiny model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: this 2-core machine is shared, and 2 threads made rounds erratic)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, npu or auto (the engine and generate share it)")
    ap.add_argument("--max-batch-rows", type=int, default=None,
                    help="the engine's rows (prompts x n) decoded together (default: HFEngine's); generate always takes all")
    args = ap.parse_args()

    spec = resolve_device(args.device)
    spec.configure(threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="vlrl-bench-rollout-"))
    make_dataset(work / "data", seed=0, n=400, n_eval=args.prompts)
    if args.model is not None:
        model, processor = load_model(args.model, device=spec.kind, trainable=False), load_processor(args.model)
        trained = f"checkpoint {args.model}"
    else:
        model, processor = build_tiny_model(corpus_texts(0, 3000), preset=args.preset, seed=0)
        model.to(spec.torch_device)
        t = time.perf_counter()
        train = RecordDataset(split_path(work / "data", "train"))
        quick_train(model, processor, [train[i] for i in range(len(train))], args.train_steps)
        trained = f"{args.preset} preset, {args.train_steps} train steps ({time.perf_counter() - t:.0f} s)"
    model.eval()
    evals = RecordDataset(split_path(work / "data", "eval"))
    requests = [GenerationRequest.from_sample(evals[i], request_id=str(i)) for i in range(min(args.prompts, len(evals)))]
    params = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
    rows = {} if args.max_batch_rows is None else {"max_batch_rows": args.max_batch_rows}
    engine = HFEngine(model, processor, **rows)
    plain = HFEngine(model, processor, fast_decode=False, **rows)  # ablation: transformers' DynamicCache + sdpa

    eng_tps, gen_tps, plain_tps, eng_len, gen_len = [], [], [], [], []
    for r in range(args.rounds):
        spec.synchronize()
        t = time.perf_counter()
        groups = engine.generate(requests, params.model_copy(update={"seed": r}))
        spec.synchronize()
        dt = time.perf_counter() - t  # includes collation and building completions
        lengths = [len(c.token_ids) for g in groups for c in g]
        eng_tps.append(sum(lengths) / dt)
        eng_len.extend(lengths)
        t = time.perf_counter()
        groups = plain.generate(requests, params.model_copy(update={"seed": r}))
        plain_tps.append(sum(len(c.token_ids) for g in groups for c in g) / (time.perf_counter() - t))
        torch.manual_seed(r)
        dt, lengths = generate_baseline(model, processor, requests, params, engine.stop_token_ids, spec)
        gen_tps.append(sum(lengths) / dt)
        gen_len.extend(lengths)

    e, g = statistics.median(eng_tps), statistics.median(gen_tps)
    done = lambda ls: sum(x < args.max_new_tokens for x in ls) / len(ls)  # noqa: E731
    print(f"model: {trained}; device={spec.kind}; threads={torch.get_num_threads()}")
    print(f"{len(requests)} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, temperature={args.temperature}, rounds={args.rounds}, "
          f"engine max_batch_rows={engine.max_batch_rows}")
    print(f"HFEngine       : {e:8.0f} tokens/s  rounds={['%.0f' % x for x in eng_tps]}  mean len {statistics.mean(eng_len):.1f}, ended early {done(eng_len):.0%}")
    print(f"model.generate : {g:8.0f} tokens/s  rounds={['%.0f' % x for x in gen_tps]}  mean len {statistics.mean(gen_len):.1f}, ended early {done(gen_len):.0%}")
    p = statistics.median(plain_tps)
    print(f"HFEngine, transformers cache/attention (fast_decode=False): {p:8.0f} tokens/s  ({p / g:.2f}x generate)")
    print(f"ratio engine / generate: {e / g:.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()

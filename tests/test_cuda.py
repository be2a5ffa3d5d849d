"""The CUDA path: the checks the CPU suite makes, run again on a GPU.

Marked `gpu`, so the default suite (and CI, which has no GPU) deselects them, as it does
`slow`; `make test-gpu` (or `pytest -m gpu`) runs them, and on a machine without CUDA
they fail rather than skip. They reuse the CPU tests' builders and assertions with the
recipe device set to cuda, and add what only a GPU has: bf16 engines beside float32
trainers, Ray's GPU fractions. TF32 is off so that float32 means float32.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import test_rl_stage
import test_rl_stage_ray
import test_sft_stage
from rollout.engine import GenerationRequest, SamplingParams
from rollout.hf_engine import HFEngine
from sft.trainer import to_device
from vlrl.device import resolve_device
from vlrl.eval import _greedy_config
from vlrl.model.batching import IGNORE_INDEX, collate_for_generation, collate_for_training
from vlrl.model.packing import PackedForward, collate_packed, encode_segments, span_losses
from vlrl.model.tiny import build_tiny_model
from vlrl.tracking import read_metrics
from vlrl_test_helpers import train_micro

pytestmark = pytest.mark.gpu

_rl_recipe_cpu = test_rl_stage.rl_recipe


def _rl_recipe_fp32_engine(*args, **rl):
    """The CPU tests' RL recipe with the rollout engine in float32: on accelerators the
    engine loads bf16 by default, and the CPU tests compare logprobs at float32 tolerance."""
    rollout = {"engine_options": {"dtype": "float32"}, **rl.pop("rollout", {})}
    return _rl_recipe_cpu(*args, rollout=rollout, **rl)


@pytest.fixture(autouse=True)
def cuda(monkeypatch):
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device: torch.cuda.is_available() is False"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for mod in (test_sft_stage, test_rl_stage):
        monkeypatch.setattr(mod, "DEVICE", "cuda")
    for mod in (test_rl_stage, test_rl_stage_ray):
        monkeypatch.setattr(mod, "rl_recipe", _rl_recipe_fp32_engine)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_auto_picks_cuda_with_nccl_and_ray_gpu_fractions():
    from rlhf.placement import actor_options

    spec = resolve_device("auto")
    assert (spec.kind, spec.dist_backend, spec.ray_resource, spec.visible_devices_env) == ("cuda", "nccl", "GPU", "CUDA_VISIBLE_DEVICES")
    assert spec.count >= 1
    assert actor_options(spec, "colocate", "rollout") == {"num_cpus": 0, "num_gpus": 0.25}
    assert actor_options(spec, "split", "trainer") == {"num_cpus": 0, "num_gpus": 1}


@torch.no_grad()
def test_packed_batch_gives_each_record_its_own_loss_on_cuda():
    from test_packing import CORPUS, _samples

    model, processor = build_tiny_model(CORPUS, preset="micro", seed=0)
    model.eval().cuda()
    samples = _samples()
    segs = encode_segments(samples, processor, max_length=256)
    T = sum(s.length for s in segs[:3]) + 5
    packed = collate_packed([segs[:3], segs[3:]], processor, max_length=T, rope_index=model.model.get_rope_index)
    inputs = to_device(packed.inputs, "cuda")
    logits = PackedForward(model)(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    got = span_losses(logits, inputs["labels"], packed.spans)
    for s, (loss, n) in zip(samples, got):
        batch = to_device(collate_for_training([s], processor, max_length=256), "cuda")
        alone = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        lb = batch["labels"][0, 1:]
        keep = lb != IGNORE_INDEX
        ref = float(torch.nn.functional.cross_entropy(alone[0, :-1][keep], lb[keep], reduction="sum"))
        assert n == int(keep.sum()) and n > 0
        assert abs(loss - ref) <= 1e-5 * max(1.0, abs(ref)), (s.record.id, loss, ref)


@pytest.fixture(scope="module")
def trained():
    """The engine tests' micro model (trained on CPU), and its copy on the GPU."""
    from test_rollout_engine import _samples

    samples = _samples(16, seed=1)
    model, processor = train_micro(samples)
    return model, copy.deepcopy(model).cuda(), processor, [GenerationRequest.from_sample(s) for s in samples]


@pytest.mark.parametrize("fast_decode", [True, False])
def test_engine_greedy_on_cuda_equals_generate_on_cuda_and_the_cpu_engine(trained, fast_decode):
    cpu_model, model, processor, requests = trained
    got = HFEngine(model, processor, logprobs_mode="raw", fast_decode=fast_decode).generate(requests, SamplingParams(temperature=0.0, max_new_tokens=24))
    batch = to_device(collate_for_generation(requests, processor), "cuda")
    cfg = _greedy_config(model, processor, 24)
    cfg.update(return_dict_in_generate=True, output_logits=True)
    out = model.generate(**batch, generation_config=cfg)
    new = out.sequences[:, batch["input_ids"].shape[1]:].cpu()
    ref_logprobs = torch.stack(out.logits, 1).float().log_softmax(-1).cpu()
    stops = set(cfg.eos_token_id)
    on_cpu = HFEngine(cpu_model, processor, logprobs_mode="raw").generate(requests, SamplingParams(temperature=0.0, max_new_tokens=24))
    for b, ((c,), (c_cpu,)) in enumerate(zip(got, on_cpu)):
        row = new[b].tolist()
        end = next((i for i, t in enumerate(row) if t in stops), None)
        assert c.token_ids == (row if end is None else row[: end + 1]), f"row {b}"
        ref = ref_logprobs[b, torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5), f"row {b}"
        assert c.token_ids == c_cpu.token_ids, f"row {b}: cuda and cpu greedy differ"
        assert np.allclose(c.logprobs, c_cpu.logprobs, atol=1e-4), f"row {b}"


@torch.no_grad()
def _teacher_forced(model, processor, request, tokens: list[int]) -> torch.Tensor:
    """(L,) raw logprobs of `tokens` after the prompt, from one unbatched forward on the GPU."""
    batch = to_device(collate_for_generation([request], processor), "cuda")
    resp = torch.tensor([tokens], device="cuda")
    ids = torch.cat([batch["input_ids"], resp], 1)
    mm = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(resp)], 1)
    extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **extra).logits
    t = batch["input_ids"].shape[1]
    logp = logits[0, t - 1 : t - 1 + len(tokens)].float().log_softmax(-1)  # (L, V)
    return logp[torch.arange(len(tokens)), resp[0]].cpu()


def test_sampled_logprobs_on_cuda_equal_a_teacher_forced_forward(trained):
    _, model, processor, requests = trained
    engine = HFEngine(model, processor, logprobs_mode="raw")
    groups = engine.generate(requests[:6], SamplingParams(n=2, temperature=0.7, max_new_tokens=12, seed=3))
    for req, group in zip(requests[:6], groups):
        for c in group:
            assert np.allclose(c.logprobs, _teacher_forced(model, processor, req, c.token_ids).numpy(), atol=1e-4), req.request_id


def test_bf16_engine_beside_the_float32_engine(trained):
    """What the accelerator default (a bf16 rollout engine, float32 trainer) costs in
    logprob mismatch: measured and bounded, printed for the record."""
    _, model, processor, requests = trained
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=5)
    got = HFEngine(bf16, processor, logprobs_mode="raw").generate(requests[:8], params)
    diffs = []
    for req, group in zip(requests[:8], got):
        for c in group:
            diffs.extend((torch.tensor(c.logprobs) - _teacher_forced(model, processor, req, c.token_ids)).abs().tolist())
    mean, worst = float(np.mean(diffs)), float(np.max(diffs))
    print(f"bf16 engine vs float32 forward: mean |dlogprob| {mean:.4f}, max {worst:.4f} over {len(diffs)} tokens")
    assert 0.0 < mean < 0.05 and worst < 1.0


# --- the CPU tests, rerun with device cuda ---------------------------------------------


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return test_rl_stage.build_micro_start(tmp_path_factory.mktemp("rlstart"))


def test_micro_rl_stage_end_to_end_on_cuda(start, tmp_path):
    test_rl_stage.test_micro_rl_stage_end_to_end(start, tmp_path)


def test_equal_rewards_keep_the_weights_on_cuda(start, tmp_path):
    test_rl_stage.test_equal_rewards_skip_the_update_and_keep_the_weights(start, tmp_path)


def test_rl_resume_after_a_crash_replays_exactly_on_cuda(start, tmp_path, monkeypatch):
    test_rl_stage.test_resume_after_a_crash_replays_exactly(start, tmp_path, monkeypatch, {})


def test_rl_stage_bf16_default_engine_on_cuda(start, tmp_path):
    """The accelerator defaults (bf16 engine, bf16 compute over float32 weights) run the
    stage; the mismatch metric reports the gap the float32 run does not have."""
    data, ckpt = start
    raw = _rl_recipe_cpu(tmp_path / "run", data, ckpt, dtype="bfloat16")
    out = test_rl_stage._run(raw)
    metrics = read_metrics(out / "metrics.jsonl")
    gaps = [m["mismatch/abs_diff_mean"] for m in metrics if "mismatch/abs_diff_mean" in m]  # absent on skipped steps
    print(f"bf16 engine + bf16 compute: mismatch/abs_diff_mean per trained step {['%.4f' % g for g in gaps]}, "
          f"skipped {[m['actor/skipped'] for m in metrics]}")
    assert len(metrics) == test_rl_stage.STEPS and gaps and all(0.0 < g < 0.1 for g in gaps)
    before, after = test_rl_stage._weights(ckpt), test_rl_stage._weights(out / "checkpoint")
    assert all(after[k].dtype == torch.float32 for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.timeout(600)
def test_ray_colocate_on_cuda_with_a_killed_rollout_actor(start, tmp_path, monkeypatch):
    """Rollout actors on a quarter GPU each, one killed mid-stage: the same rows and
    weights as the inline run on the same GPU."""
    test_rl_stage_ray.test_killed_rollout_actor_is_restarted_and_its_step_retried(start, tmp_path, monkeypatch)


@pytest.mark.timeout(300)
def test_sft_sigkill_then_rerun_resumes_bitwise_on_cuda(tmp_path):
    test_sft_stage.test_sigkill_then_rerun_resumes_bitwise(tmp_path)

"""FSDP2 across 2 CPU ranks (gloo) computes the same step as one rank.

The micro Qwen2.5-VL (vision tower included: two of the four rows carry an image) is
sharded with `rlhf.fsdp.shard_model`; each rank takes half the batch, its loss is its
share of one token-mean over the whole batch, times the world size because FSDP2
averages gradients across ranks. The gathered gradients and the weights after one
AdamW step must match a single-process run on the full batch.

Tolerance: float32; the two runs sum the same terms in a different order (per-rank
partial sums, then a reduce-scatter), so they agree to ~1e-6 relative; we allow 1e-4
absolute on weights (AdamW moves each by ~lr = 1e-3, so a wrong gradient fails) and
1e-5 relative on the gradient norm per tensor.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from rlhf.placement import free_port
from vlrl.data.images import Sample
from vlrl.data.records import Record

LR = 1e-3


def _samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        n_img = i % 2
        content = [{"type": "image"}] * n_img + [{"type": "text", "text": f"What is {i} plus {i}?" + " Think." * i}]
        rec = Record(
            id=f"q{i}",
            messages=[{"role": "user", "content": content}, {"role": "assistant", "content": f"It is {2 * i}. \\boxed{{{2 * i}}}"}],
            images=["x.png"] * n_img,
            answer=str(2 * i),
            task="arith",
            family="reasoning",
        )
        imgs = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(n_img)]
        out.append(Sample(rec, imgs, i + 1))
    return out


def _loss(model, batch, total_tokens: int, scale: float) -> torch.Tensor:
    """Sum of token cross-entropies / tokens of the whole batch (so ranks add up)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits  # (b, T, V)
    labels = batch["labels"][:, 1:]  # (b, T-1)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return ce * scale / total_tokens


def _step(model, batch, total_tokens: int, scale: float):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    _loss(model, batch, total_tokens, scale).backward()
    return opt


def _rank_main(rank: int, world: int, port: int, model_dir: str, out_path: str) -> None:
    from rlhf.fsdp import full_grads, full_state_dict, init_process_group, shard_model
    from vlrl.device import resolve_device
    from vlrl.model.batching import collate_for_training
    from vlrl.model.loading import load_model, load_processor

    torch.set_num_threads(1)
    device = resolve_device("cpu")
    init_process_group(device, rank, world, master_port=port)
    model = load_model(model_dir, device="cpu")
    processor = load_processor(model_dir)
    model.train()
    shard_model(model, device)
    samples = _samples(4)
    full = collate_for_training(samples, processor, max_length=128)
    total = int((full["labels"][:, 1:] != -100).sum())
    per = len(samples) // world
    batch = collate_for_training(samples[rank * per : (rank + 1) * per], processor, max_length=128)
    opt = _step(model, batch, total, scale=float(world))  # FSDP2 averages grads over ranks
    grads = full_grads(model)
    opt.step()
    weights = full_state_dict(model)
    sharded = sum(1 for p in model.parameters() if hasattr(p, "full_tensor"))
    if rank == 0:
        torch.save({"grads": grads, "weights": weights, "sharded": sharded, "n_params": len(list(model.parameters()))}, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_rank_fsdp2_matches_single_rank(tmp_path):
    from vlrl.model.batching import collate_for_training
    from vlrl.model.loading import load_model, load_processor
    from vlrl.model.tiny import init_tiny_model

    corpus = [m.parts()[-1].text for s in _samples(4) for m in s.record.messages] * 10
    model_dir = init_tiny_model(tmp_path / "model", corpus, preset="micro", seed=0)

    # Single process, full batch.
    torch.set_num_threads(1)
    model = load_model(model_dir, device="cpu")
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    model.train()
    batch = collate_for_training(_samples(4), load_processor(model_dir), max_length=128)
    total = int((batch["labels"][:, 1:] != -100).sum())
    opt = _step(model, batch, total, scale=1.0)
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    ref_weights = {n: t.detach().clone() for n, t in model.state_dict().items()}

    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(2, free_port(), str(model_dir), str(out)), nprocs=2, join=True)
    got = torch.load(out)

    assert got["sharded"] == got["n_params"] > 0  # every parameter is a DTensor shard
    assert set(got["grads"]) == set(ref_grads)
    assert any(g.abs().sum() > 0 for n, g in ref_grads.items() if n.startswith("model.visual"))  # vision tower trained too
    for name, g in ref_grads.items():
        err = (got["grads"][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-5, f"gradient of {name}: relative error {err:.2e}"
    for name, w in ref_weights.items():
        assert torch.allclose(got["weights"][name], w, atol=1e-4, rtol=0), f"weight {name} differs after the step"
    # The step moved the weights by ~lr (so the equality above is not vacuous).
    assert all((ref_weights[n] - before[n]).abs().max() > LR / 2 for n in ref_grads)


# ------------------------------------------------------------------ the RL trainers on Ray actors


def _policy_batch(model_dir):
    """3 rows: one with an image, two text-only; with micro-batches of 1 and rows dealt
    round-robin by length, rank 1 gets only text rows plus a filler forward, so its
    vision tower is never used (the case `keep_grads_defined` and the root-held tower exist for)."""
    from rlhf.batch import build_policy_batch
    from rollout.engine import Completion, GenerationRequest
    from vlrl.data.records import Message
    from vlrl.model.loading import load_processor

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    reqs = [
        GenerationRequest(request_id="t", messages=(Message(role="user", content="What is 2 plus 2?"),)),
        GenerationRequest(request_id="i", messages=(Message(role="user", content=[{"type": "image"}, {"type": "text", "text": "Count."}]),), images=(img,)),
    ]
    comps = [
        Completion(request_id=r, sample_index=k, token_ids=toks, text="x", logprobs=None, finish_reason="stop", prompt_tokens=1, policy_version=0)
        for r, k, toks in (("t", 0, [5, 6]), ("t", 1, [7, 8, 9]), ("i", 0, [5, 6, 7, 8]))
    ]
    return build_policy_batch(reqs, [0, 0, 1], comps, load_processor(model_dir))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_fsdp2_policy_and_reference_actors_match_one_rank(tmp_path, ray_local):
    from rlhf.placement import spawn_ranks
    from rlhf.workers import PolicyTrainer, ReferenceWorker
    from vlrl.device import resolve_device
    from vlrl.model.loading import load_model
    from vlrl.model.tiny import init_tiny_model
    from vlrl.recipe_base import OptimSpec
    from vlrl.rl_config import RLAlgoConfig

    torch.set_num_threads(1)
    model_dir = init_tiny_model(tmp_path / "model", ["What is 2 plus 2? Count. It is 4."] * 20, preset="micro", seed=0)
    batch = _policy_batch(model_dir)
    assert batch.rows == 3 and batch.pixel_values is not None
    # The case under test: rank 1's micro-batches (a real one and a filler) hold no image.
    from rlhf.fsdp import rank_chunks
    from rlhf.workers import _by_length

    has_image = batch.mm_token_type_ids.ne(0).any(1)  # (B,)
    rank1 = rank_chunks(_by_length(batch, torch.arange(3)), 1, 1, 2)
    assert [real for _, real in rank1] == [True, False] and not any(has_image[r].any() for r, _ in rank1)
    adv = torch.tensor([[1.0, -0.5, 0.0, 0.0], [0.5, 1.0, -1.0, 0.0], [-1.0, 0.5, 1.0, 0.25]])[:, : batch.response_width]  # (B, R)
    kw = dict(device="cpu", temperature=1.0, micro_batch_size=1, threads=1)
    optim = OptimSpec(lr=1e-3, warmup_steps=0, schedule="constant", grad_clip=None)
    update = dict(ref_logprobs=None, kl_coef=0.0, lr=1e-3, step=0)

    one = PolicyTrainer(model_dir, algo=RLAlgoConfig(), optim=optim, **kw)
    ref_lp = ReferenceWorker(model_dir, **kw).logprobs(batch)  # (B, R)
    m1 = one.update(batch, adv, **update)

    group = spawn_ranks(PolicyTrainer, 2, "colocate", resolve_device("cpu"), "trainer", str(model_dir), algo=RLAlgoConfig(), optim=optim, **kw)
    refs = spawn_ranks(ReferenceWorker, 2, "colocate", resolve_device("cpu"), "reference", str(model_dir), **kw)
    lp2 = refs.logprobs(batch)
    m2 = group.update(batch, adv, **update)

    # Reference log-probabilities: every row, gathered from both ranks' shares.
    assert torch.allclose(lp2, ref_lp, atol=1e-5) and bool((ref_lp[batch.response_mask.bool()] < 0).all())
    # The update: same loss, grad norm and token count as one rank ...
    for key in ("actor/pg_loss", "actor/grad_norm", "perf/train_tokens"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    assert m1["actor/grad_norm"] > 0
    # ... and the same weights after it, gathered (what a weight sync sends) and as saved.
    from rollout.weight_sync import unpack

    synced = dict(unpack(group.packed(False)))
    want = {n: p.detach() for n, p in one.model.named_parameters() if p.requires_grad}
    assert set(synced) == set(want)
    base = load_model(model_dir, device="cpu")
    moved_vision = 0
    for name, w in want.items():
        got = torch.as_tensor(synced[name])
        assert torch.allclose(got, w, atol=1e-5), f"{name} differs after the 2-rank step"
        if name.startswith("model.visual") and not torch.equal(w, base.state_dict()[name]):
            moved_vision += 1
    assert moved_vision > 0  # the tower trained on rank 0 only, and both ranks agree on it
    group.save_pretrained(tmp_path / "saved")
    saved = load_model(tmp_path / "saved", device="cpu").state_dict()
    for name, w in want.items():
        assert torch.allclose(saved[name], w, atol=1e-5), name
    group.kill()
    refs.kill()


def test_rank_chunks_give_every_rank_the_same_number_of_forwards():
    from rlhf.fsdp import rank_chunks

    rows = torch.arange(7)
    for world, mbs in ((2, 2), (3, 1), (4, 3), (2, None)):
        parts = [rank_chunks(rows, mbs, r, world) for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # collectives stay in step
        real = sorted(int(i) for p in parts for rs, ok in p if ok for i in rs)
        assert real == list(range(7))  # every row once, fillers apart
        assert all(len(rs) <= (mbs or 7) for p in parts for rs, _ in p)
    # More ranks than rows: the rank with none still forwards once (a filler).
    ((filler, ok),) = rank_chunks(torch.arange(1), 4, 1, 2)
    assert not ok and filler.tolist() == [0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rl_stage_with_two_trainer_ranks_follows_the_single_rank_run_and_resumes(tmp_path, monkeypatch):
    """The whole stage with `trainer_ranks: 2` (policy and reference as two FSDP2 actors
    each, KL on), stopped by an error after its step-2 checkpoint and rerun: the same
    rollouts and, within float tolerance, the same weights as one uninterrupted rank
    (the rerun reads the gathered optimizer state back into both ranks' shards)."""
    import ray
    from rlhf import stage as stage_mod
    from rollout.store import RolloutStore
    from test_rl_stage import _run, _weights, build_micro_start, rl_recipe

    data, ckpt = build_micro_start(tmp_path / "start")
    kl = {"algo": {"kl": {"coef": 0.05}}}
    one = _run(rl_recipe(tmp_path / "one", data, ckpt, steps=3, **kl))
    raw = rl_recipe(tmp_path / "two", data, ckpt, steps=3, placement="colocate", trainer_ranks=2, ray={"num_cpus": 2}, **kl)
    real_step = stage_mod.Controller.step

    def crash_at_2(self, s):
        if s == 2:
            raise RuntimeError("simulated crash")
        return real_step(self, s)

    monkeypatch.setattr(stage_mod.Controller, "step", crash_at_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(raw)
    monkeypatch.setattr(stage_mod.Controller, "step", real_step)
    two = _run(raw)
    assert not ray.is_initialized()

    def rows(stage):
        with RolloutStore(stage / "rollouts.sqlite", readonly=True) as store:
            return sorted((r.step, r.group_id, r.sample_index, r.response) for r in store.query(limit=10_000))

    assert rows(one) == rows(two) and {r[0] for r in rows(one)} == {0, 1, 2}
    a, b = _weights(one / "checkpoint"), _weights(two / "checkpoint")
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"2-rank weights differ from 1-rank by {worst:.2e}"

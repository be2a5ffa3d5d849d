"""The trainer loop: accumulation equals one big batch; save/restore continues bitwise."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from sft.state import TrainerState, find_state, load_state, read_state, save_state
from sft.trainer import IGNORE, LoopHooks, make_optimizer, optimizer_step, token_loss_sum, train_steps
from vlrl.recipe import OptimSpec


class TinyLM(torch.nn.Module):
    """A stand-in with the HF calling convention: model(input_ids=..., attention_mask=...).logits."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).cumsum(dim=1)  # (B, T, D): depends on the prefix
        return SimpleNamespace(logits=self.head(self.norm(h)))


def _batch(gen: torch.Generator, b: int, t: int, vocab: int = 11) -> dict:
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    labels = ids.clone()
    labels[:, : t // 3] = IGNORE  # prompt tokens carry no loss
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _split(batch: dict, at: int) -> list[dict]:
    return [{k: v[:at] for k, v in batch.items()}, {k: v[at:] for k, v in batch.items()}]


def test_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batch = _batch(gen, 6, 12)
    a, b = TinyLM(), TinyLM()
    b.load_state_dict(a.state_dict())
    spec = OptimSpec(lr=0.1, grad_clip=None, weight_decay=0.0)
    oa, ob = make_optimizer(a.named_parameters(), spec), make_optimizer(b.named_parameters(), spec)
    ra = optimizer_step(a, oa, [batch], lr=0.1, grad_clip=None)
    rb = optimizer_step(b, ob, _split(batch, 2), lr=0.1, grad_clip=None)  # unequal token counts per micro-batch
    assert abs(ra.loss - rb.loss) < 1e-6 and ra.tokens == rb.tokens
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_token_loss_sum_counts_only_labelled_tokens():
    gen = torch.Generator().manual_seed(2)
    batch = _batch(gen, 3, 9)
    loss, n = token_loss_sum(TinyLM(), batch)
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert loss.item() > 0


def _run(model, opt, batches, start, total, spec, ckpt=lambda d: None, every=10**9):
    train_steps(model, opt, iter(batches[start:]), start=start, total=total, spec=spec, device=torch.device("cpu"),
                hooks=LoopHooks(lambda s, m: None, ckpt, log_every=2, checkpoint_every=every))


def test_resume_from_saved_state_is_bitwise_identical(tmp_path):
    gen = torch.Generator().manual_seed(3)
    batches = [[_batch(gen, 4, 10)] for _ in range(8)]
    spec = OptimSpec(lr=0.05, warmup_steps=2, schedule="cosine")
    torch.manual_seed(0)
    ref = TinyLM()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    _run(ref, make_optimizer(ref.named_parameters(), spec), batches, 0, 8, spec)

    first = TinyLM()
    first.load_state_dict(init)
    opt = make_optimizer(first.named_parameters(), spec)

    class Killed(Exception):
        pass

    def ckpt(done):
        save_state(tmp_path / "state", first, opt, TrainerState(step=done, global_step=done))
        raise Killed  # the process dies right after its checkpoint at step 4

    try:
        _run(first, opt, batches, 0, 8, spec, ckpt=ckpt, every=4)
    except Killed:
        pass

    resumed = TinyLM()  # fresh process: new model, new optimizer, state from disk
    opt2 = make_optimizer(resumed.named_parameters(), spec)
    st = load_state(tmp_path / "state", resumed, opt2)
    assert st.step == 4
    _run(resumed, opt2, batches, st.step, 8, spec)
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_kill_between_renames_keeps_a_state(tmp_path):
    m = TinyLM()
    save_state(tmp_path / "state", m, None, TrainerState(step=7))
    os.replace(tmp_path / "state", tmp_path / "state.old")  # as if killed mid-swap
    assert find_state(tmp_path / "state") == tmp_path / "state.old"
    assert read_state(tmp_path / "state").step == 7


def test_no_state_reads_as_none(tmp_path):
    assert read_state(tmp_path / "nothing") is None
    assert load_state(tmp_path / "nothing", TinyLM()) is None

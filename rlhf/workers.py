"""The policy trainer, the reference worker and the reward worker of the RL stage.

Plain classes: rlhf/placement.py runs each one in the controller's process or as a Ray
actor, and the controller calls the same methods either way. (The rollout worker lives
in rollout/worker.py, beside the engines.)

The trainer's update, where it departs from verl's actor:
- With one epoch and one mini-batch (the default) the "old" log-probabilities are the
  current ones, detached, from the same forward pass (ratio exactly 1, as TRL does for
  num_iterations=1); verl always runs a separate no-grad pass. A second pass runs only
  when it is needed: several optimizer steps per RL step, or a mismatch correction that
  must see the whole batch.
- The logits are divided by the rollout temperature (as verl does), so the trainer's
  log-probabilities and the sampler's describe the same distribution and their gap is
  the mismatch metric.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from rlhf import algos as A
from rlhf.batch import PolicyBatch, response_logprobs
from rlhf.fsdp import whole
from sft.pretrain import TRAINABLE
from sft.trainer import compute_context, make_optimizer, prepare_for_training
from vlrl.recipe_base import OptimSpec
from vlrl.rl_config import RLAlgoConfig

# Metrics whose micro-batch values are parts of one mini-batch loss (global LossNorm): summed.
_ADDITIVE = ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/perception_kl")


def _chunks(rows: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    if size is None or size >= len(rows):
        return [rows]
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _by_length(batch: PolicyBatch, rows: torch.Tensor) -> torch.Tensor:
    """`rows` ordered by sequence length, so micro-batches cut from it hold similar lengths."""
    lengths = batch.attention_mask[rows].sum(1)  # (b,)
    return rows[torch.argsort(lengths, stable=True)]


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """(b, r) -> (b, width), zero-padded on the right (a trimmed micro-batch back to R)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _micro_batches(rows: torch.Tensor, size: int | None, ranks: "Ranks") -> list[tuple[torch.Tensor, bool]]:
    """This rank's micro-batches of `rows` -> [(rows, real?)]; one rank: all of them, all real."""
    if ranks.world == 1:
        return [(c, True) for c in _chunks(rows, size)]
    from rlhf.fsdp import rank_chunks

    return rank_chunks(rows, size, ranks.rank, ranks.world)


class Ranks:
    """Where this trainer process sits among the FSDP2 ranks (world 1: no process group)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None) -> None:
        self.rank, self.world, self.device = rank, world, device or torch.device("cpu")


_SINGLE = Ranks()


@torch.no_grad()
def batch_logprobs(
    model: torch.nn.Module, batch: PolicyBatch, temperature: float, micro_batch_size: int | None, suppress=(), ranks: Ranks = _SINGLE
) -> torch.Tensor:
    """log pi(response tokens) (B, R) without gradient, in length-sorted micro-batches."""
    return batch_logprobs_entropy(model, batch, temperature, micro_batch_size, suppress, entropy=False, ranks=ranks)[0]


@torch.no_grad()
def batch_logprobs_entropy(
    model: torch.nn.Module, batch: PolicyBatch, temperature: float, micro_batch_size: int | None, suppress=(), *, entropy: bool = True,
    ranks: Ranks = _SINGLE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi(response tokens) (B, R), token entropy (B, R) or None) without gradient.
    Across ranks each computes its share of rows and the shares are summed into the whole."""
    out = torch.zeros(batch.rows, batch.response_width)
    ent = torch.zeros(batch.rows, batch.response_width) if entropy else None
    for rows, real in _micro_batches(_by_length(batch, torch.arange(batch.rows)), micro_batch_size, ranks):
        lp, e = response_logprobs(model, batch.select(rows, trim=True), temperature, entropy=entropy, suppress=suppress)
        if not real:
            continue  # a filler forward that keeps the ranks' collectives in step
        out[rows] = _widen(lp.cpu(), batch.response_width)
        if ent is not None:
            ent[rows] = _widen(e.cpu(), batch.response_width)
    if ranks.world > 1:
        from rlhf.fsdp import all_rows

        out = all_rows(out, ranks.device)
        ent = None if ent is None else all_rows(ent, ranks.device)
    return out, ent


def _load_for_ranks(model_path, device: str, *, dtype: str | None, trainable: bool, rank: int, world: int, master_port: int | None):
    """The model on this process's device; with world > 1 this process joins the
    trainers' process group first (which picks its device). Shard it with
    `rlhf.fsdp.shard_model` once trainability is set. -> (model, Ranks)."""
    from vlrl.model.loading import load_model

    if world > 1:
        from rlhf.fsdp import init_process_group
        from vlrl.device import resolve_device

        init_process_group(resolve_device(device), rank, world, master_port=master_port or 29511)
    model = load_model(model_path, device=device, dtype=dtype, trainable=trainable)
    return model, Ranks(rank, world, next(model.parameters()).device)


class PolicyTrainer:
    """The policy being trained: model, AdamW, one RL update per call."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str,
        algo: RLAlgoConfig,
        optim: OptimSpec,
        trainable: str = "all",
        temperature: float = 1.0,
        micro_batch_size: int | None = None,
        threads: int | None = None,
        suppress: tuple[int, ...] = (),
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        rank: int = 0,
        world_size: int = 1,
        master_port: int | None = None,
    ) -> None:
        """`suppress`: token ids the sampler never draws (masked here too, see rlhf.batch).
        `rank`/`world_size`: this process's place among the FSDP2 trainer ranks (each
        rank is built with the same arguments and every method is called on all of them)."""
        from vlrl.model.loading import component_of, load_processor, set_trainable

        if threads is not None:
            torch.set_num_threads(threads)
        # Parameters (and so AdamW's update) in float32 whatever `dtype` says: `dtype` is the
        # compute dtype, applied by FSDP2's mixed precision or by autocast on one rank.
        self.model, self.ranks = _load_for_ranks(
            model_path, device, dtype="float32", trainable=True, rank=rank, world=world_size, master_port=master_port
        )
        self.compute_dtype = _compute_dtype(dtype, device)
        self.processor = load_processor(model_path)
        set_trainable(self.model, TRAINABLE[trainable])
        prepare_for_training(self.model, gradient_checkpointing=gradient_checkpointing)
        self.model.train()
        if world_size > 1:
            from rlhf.fsdp import shard_model
            from vlrl.device import resolve_device

            # Before the optimizer: it must see the shards.
            shard_model(self.model, resolve_device(device), compute_dtype=self.compute_dtype)
        self.optimizer = make_optimizer(self.model.named_parameters(), optim, component_of)
        self.algo, self.optim, self.temperature, self.micro_batch_size = algo, optim, temperature, micro_batch_size
        self.suppress = tuple(suppress)

    def _autocast(self):
        """One rank computing below float32: autocast over float32 parameters (several
        ranks get the same from FSDP2's mixed precision instead)."""
        if self.ranks.world == 1:
            return compute_context(self.ranks.device, self.compute_dtype)
        return contextlib.nullcontext()

    # -- the update ---------------------------------------------------------
    def update(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self._autocast():
            return self._update(*args, **kwargs)

    def _update(
        self,
        batch: PolicyBatch,
        advantages: torch.Tensor,  # (B, R)
        *,
        ref_logprobs: torch.Tensor | None,  # (B, R)
        kl_coef: float,
        lr: float,
        step: int,
        perception_rows: torch.Tensor | None = None,  # (B,) 1 on perception prompts (the anchor KL's rows)
        guide_rows: torch.Tensor | None = None,  # (B,) 1 on reference solutions guidance added (shaped when algo.guidance.shaping)
    ) -> dict[str, float]:
        """Epochs x mini-batches of optimizer steps on one RL step's batch -> metrics."""
        t0 = time.perf_counter()
        cfg = self.algo
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        mbs = list(A.minibatches(batch.rows, cfg.mini_batch_size, cfg.epochs, seed=cfg.seed, step=step, shuffle=cfg.shuffle))
        mask = batch.response_mask
        correct = batch.rollout_logprobs is not None and (cfg.mismatch.is_level is not None or cfg.mismatch.rejection is not None)
        old, is_weights, metrics = None, None, {}
        if len(mbs) > 1 or correct:
            old = batch_logprobs(self.model, batch, self.temperature, self.micro_batch_size, self.suppress, self.ranks)
        if correct:
            is_weights, mask, metrics = A.rollout_correction(old, batch.rollout_logprobs, mask, cfg.mismatch)
        # Dr.GRPO's divisor defaults to the padded width: keep it, do not trim responses then.
        trim_responses = not (cfg.loss.agg_mode == "seq-mean-token-sum-norm" and cfg.loss.loss_scale_factor is None)
        per_mb: list[dict[str, float]] = []
        tokens, grad_norms = 0, []
        anchor_on = cfg.perception_anchor.kl_coef > 0 and perception_rows is not None
        for mb in mbs:
            norm = A.LossNorm.of(mask[mb.indices])
            anchor_norm = A.LossNorm.of(mask[mb.indices] * perception_rows[mb.indices, None]) if anchor_on else None
            anchor_mb = anchor_on and bool(anchor_norm.batch_num_tokens)  # no perception tokens: no anchor term
            sums: dict[str, list[float]] = collections.defaultdict(list)
            for rows, real in _micro_batches(_by_length(batch, mb.indices), self.micro_batch_size, self.ranks):
                sub = batch.select(rows).trimmed(trim_responses)
                r = sub.response_width

                def cut(x: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
                    return None if x is None else x[rows][:, :r].to(dev)  # (b, R) -> the micro-batch's (b, r)

                logp, ent = response_logprobs(
                    self.model, sub, self.temperature, entropy=True, entropy_grad=cfg.entropy.coef > 0, suppress=self.suppress
                )
                loss, m = A.actor_loss(
                    logp,
                    logp.detach() if old is None else cut(old, logp.device),
                    cut(advantages, logp.device),
                    cut(mask, logp.device),
                    cfg,
                    kl_coef=kl_coef,
                    ref_logprobs=cut(ref_logprobs, logp.device),
                    entropy=ent,
                    rollout_logprobs=None if sub.rollout_logprobs is None else sub.rollout_logprobs.to(logp.device),
                    rollout_is_weights=cut(is_weights, logp.device),
                    norm=norm,
                    anchor_rows=perception_rows[rows].to(logp.device) if anchor_mb else None,
                    anchor_norm=anchor_norm,
                    guide_rows=None if guide_rows is None else guide_rows[rows].to(logp.device),
                )
                if self.ranks.world > 1:
                    from rlhf.fsdp import keep_grads_defined

                    # FSDP2 averages gradients over ranks; the loss is already this rank's
                    # share of the global token mean, so scale the average back to a sum.
                    loss = loss * (self.ranks.world if real else 0.0) + keep_grads_defined(self.model)
                loss.backward()
                if not real:
                    continue
                tokens += sub.tokens()
                for k, v in m.items():
                    sums[k].append(v)
            grad_norms.append(self._optimizer_step())
            if self.ranks.world > 1:
                from rlhf.fsdp import gather_objects

                merged: dict[str, list[float]] = collections.defaultdict(list)
                for part in gather_objects(dict(sums)):
                    for k, v in part.items():
                        merged[k].extend(v)
                sums = merged
            per_mb.append({k: (sum(v) if k in _ADDITIVE else sum(v) / len(v)) for k, v in sums.items()})
        for k in per_mb[0]:
            vals = [m[k] for m in per_mb if k in m and m[k] is not None and math.isfinite(m[k])]
            if vals:
                metrics[k] = sum(vals) / len(vals)
        seconds = time.perf_counter() - t0
        if self.ranks.world > 1:
            from rlhf.fsdp import gather_objects

            tokens = sum(gather_objects(tokens))
        metrics.update(
            {
                "actor/grad_norm": sum(grad_norms) / len(grad_norms),
                "actor/lr": lr,
                "actor/optimizer_steps": float(len(mbs)),
                "perf/train_tokens": float(tokens),
                "perf/train_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            }
        )
        return metrics

    def visual_logprobs(self, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log pi(response) (B, R) with the real images and with masked (mean) images, and the
        token entropy with the real images (B, R), no gradient: the visual dependency and its
        entropy guard (rlhf/perception.py)."""
        from rlhf.perception import masked_image_batch

        with self._autocast():
            return self._visual_logprobs(batch, masked_image_batch)

    def _visual_logprobs(self, batch: PolicyBatch, masked_image_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real, ent = batch_logprobs_entropy(self.model, batch, self.temperature, self.micro_batch_size, self.suppress, ranks=self.ranks)
        masked = batch_logprobs(self.model, masked_image_batch(batch), self.temperature, self.micro_batch_size, self.suppress, self.ranks)
        return real, masked, ent

    def _optimizer_step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            norm = 0.0
        else:
            # max_norm inf: the total norm without clipping (over DTensor shards too).
            total = torch.nn.utils.clip_grad_norm_(params, self.optim.grad_clip or math.inf, foreach=True)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- weights --------------------------------------------------------------
    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The tensors an update can change (what a weight sync sends); gathered from the
        shards across ranks (a collective: call on every rank)."""
        return {n: whole(p) for n, p in self.model.named_parameters() if p.requires_grad}

    def all_weights(self) -> dict[str, torch.Tensor]:
        """Every tensor (for a rollout worker that restarted from the initial checkpoint)."""
        return {n: whole(t) for n, t in self.model.state_dict().items()}

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        """Gathered tensors without the second names of tied ones (lm_head = embeddings),
        as save_pretrained writes a whole model (collective)."""
        every = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        tied = every - {n for n, _ in self.model.named_parameters()}
        return {n: t for n, t in self.all_weights().items() if n not in tied}

    def packed(self, full: bool = False):
        """Packed weights for the rollout workers; on ranks other than 0, None (they only
        take part in the gather)."""
        from rollout.weight_sync import pack

        items = self.model.state_dict().items() if full else ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        if self.ranks.world == 1:
            return pack(items)
        # One tensor gathered at a time and moved to host at once (pack does both), so no
        # rank ever holds a second whole model on the device; the other ranks only take part.
        if self.ranks.rank == 0:
            return pack(items)
        for _, t in items:
            whole(t)
        return None

    # -- checkpoints ----------------------------------------------------------
    def save_checkpoint(self, state_dir: Path, state: dict[str, Any]) -> None:
        """Collective across ranks: rank 0 writes the gathered model and optimizer state."""
        from rlhf.checkpoint import save_checkpoint

        if self.ranks.world == 1:
            save_checkpoint(Path(state_dir), self.model, self.processor, self.optimizer.state_dict(), state)
            return
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = self._weights_to_save()
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ranks.rank == 0:
            save_checkpoint(Path(state_dir), self.model, self.processor, optim, {**state, "trainer_ranks": self.ranks.world}, weights=weights)
        dist.barrier()

    def load_optimizer(self, path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        by_name = any(isinstance(k, str) for k in saved.get("state", {}))  # written by a multi-rank run
        if by_name != (self.ranks.world > 1):
            raise RuntimeError(
                f"{path}: optimizer state written with trainer_ranks {'>1' if by_name else '1'}, "
                f"but this run has trainer_ranks {self.ranks.world}; resume with the same trainer_ranks"
            )
        if self.ranks.world == 1:
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, saved, options=StateDictOptions(full_state_dict=True))

    def save_pretrained(self, out_dir: Path) -> None:
        """Collective across ranks; rank 0 writes."""
        from sft.state import save_hf_checkpoint

        weights = self._weights_to_save() if self.ranks.world > 1 else None
        if self.ranks.rank == 0:
            save_hf_checkpoint(Path(out_dir), self.model, self.processor, weights=weights)
        if self.ranks.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _compute_dtype(dtype: str | None, device: str) -> torch.dtype:
    from vlrl.device import resolve_device
    from vlrl.model.loading import default_dtype

    return getattr(torch, dtype) if dtype else default_dtype(resolve_device(device).kind)


class ReferenceWorker:
    """The frozen starting policy: log-probabilities for the KL term."""

    def __init__(
        self, model_path: str | Path, *, device: str, temperature: float = 1.0, micro_batch_size: int | None = None,
        threads: int | None = None, suppress: tuple[int, ...] = (), dtype: str | None = None, gradient_checkpointing: bool = False,
        rank: int = 0, world_size: int = 1, master_port: int | None = None,
    ):
        """`gradient_checkpointing` is accepted for symmetry with the trainer and ignored (no backward here)."""
        if threads is not None:
            torch.set_num_threads(threads)
        self.model, self.ranks = _load_for_ranks(
            model_path, device, dtype=dtype, trainable=False, rank=rank, world=world_size, master_port=master_port
        )
        if world_size > 1:
            from rlhf.fsdp import shard_model
            from vlrl.device import resolve_device

            shard_model(self.model, resolve_device(device))
        self.temperature, self.micro_batch_size, self.suppress = temperature, micro_batch_size, tuple(suppress)

    def logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        return batch_logprobs(self.model, batch, self.temperature, self.micro_batch_size, self.suppress, self.ranks)


class RewardWorker:
    """The reward stack (rule rewards in its own process pool, model rewards in-process)."""

    def __init__(self, config):
        """`config`: a validated rewards.stack.RewardStackConfig (rlhf.reward_config.validate_rewards)."""
        from rewards.stack import RewardStack

        self.stack = RewardStack.from_config(config).start()

    def score(self, samples: list) -> tuple[list, dict[str, float]]:
        results = self.stack.score(samples)
        return results, self.stack.metrics()

    def close(self) -> None:
        self.stack.close()

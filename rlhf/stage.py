"""The RL stage: the controller that drives GRPO (or any critic-free estimator) step by step.

One step, top to bottom (`Controller.step`):
  prompts (curriculum, cursor) -> G samples per prompt (rollout workers, weights of
  version = step, never older) -> rewards (reward stack) [-> more prompts while DAPO
  dynamic sampling drops equal-reward groups] -> reference logprobs (if KL) ->
  advantages -> policy update (epochs x mini-batches; skipped when no sample carries a
  learning signal) -> weight sync (version step + 1) -> rollout store rows -> metrics
  -> checkpoint every `checkpoint_every` steps.

Policy version v means "the weights after v completed steps"; step s samples with
version s, so every rollout is on-policy and the store says so per row.

Resume: the last checkpoint (rlhf/checkpoint.py) holds the policy, optimizer, step,
prompt cursor, KL coefficient and RNG states; the store drops rows of the steps after
it (`discard_after`), and those steps run again exactly as they would have: sampling
seeds, prompt draws and mini-batch orders are pure functions of (seed, step, ...).

Where we depart from the GRPO paper and from TRL/verl: see rlhf/workers.py (the update)
and docs/rl-algorithms.md (the math); the loop itself is synchronous and on-policy.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlhf import algos as A
from rlhf.batch import build_policy_batch
from rlhf.checkpoint import read_checkpoint
from rlhf.heldout import HeldoutCurve, curve_summary, curve_table, describe_point, read_curve
from rlhf.health import (
    AnswerCollapseWatch,
    FirstStepCollapseWatch,
    ModeLengthWatch,
    RewardFailureWatch,
    TruncationWatch,
    answer_key,
    first_step_key,
    length_is_penalised,
    route_fns,
    top_share,
)
from sft.state import rng_state, set_rng_state
from rlhf.curriculum import PromptCurriculum
from rlhf.placement import RankGroup, check_resources, make_rollout_pool, rank_bundles, spawn, spawn_ranks, start_ray, stop_ray
from rlhf.reward_config import validate_rewards
from rlhf.workers import PolicyTrainer, ReferenceWorker, RewardWorker
from rollout.engine import Completion, GenerationRequest, SamplingParams
from rollout.store import RolloutRow, RolloutStatus, RolloutStore
from sft.trainer import lr_at
from vlrl.recipe_rl import RlStage


@dataclass
class Group:
    """One prompt of a step and its G samples."""

    gid: str  # unique within the step
    record_index: int
    request: GenerationRequest
    completions: list[Completion]
    results: list[Any]  # rewards.stack.RewardResult per completion
    kept: bool = True  # dynamic sampling kept it for the update
    mode: str | None = None  # reasoning mode of the prompt (rlhf/modes.py), None without modes
    guide: Completion | None = None  # the record's reference solution, trained on with the samples (rlhf/guidance.py)
    guide_result: Any = None

    @property
    def trained(self) -> list[tuple[Completion, Any]]:
        """(completion, result) of every member the update sees: the samples, then the guide."""
        out = list(zip(self.completions, self.results))
        return out + [(self.guide, self.guide_result)] if self.guide is not None else out


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t


class Controller:
    def __init__(self, ctx, cfg: RlStage) -> None:
        from rollout.hf_engine import input_only_ids
        from vlrl.data.images import RecordDataset
        from vlrl.data.io import split_path
        from vlrl.model.loading import load_processor

        self.ctx, self.cfg, self.placement = ctx, cfg, cfg.placement
        self.last_answers: dict[str, list] = {}  # per task (response answer, reference answer) of the last step
        self.last_first_steps: dict[str, list] = {}  # per task (response's first computation, reference's) of the last step
        self.last_failures: list[dict[str, str]] = []  # per sample of the last step, RewardResult.failures
        where = f"stages.{ctx.name}"
        reward_cfg = validate_rewards(cfg, where)  # before anything is loaded
        self.seed = ctx.seed()
        self.data_file = split_path(ctx.inputs["data"], "train")
        self.dataset = RecordDataset(self.data_file)
        self.curriculum = PromptCurriculum(self.dataset.records, cfg.curriculum, self.seed, where=f"{where}.curriculum")
        self.state_dir = ctx.dir / "state"
        found = read_checkpoint(self.state_dir)
        self.start, self.cursor, self.kl_coef = 0, 0, A.initial_kl_coef(cfg.algo.kl, cfg.steps)
        # The starting policy, as every worker loads it: with the stage's pixel bounds, if any,
        # in its processor (the checkpoints this stage writes carry them on).
        self.base_path = Path(ctx.inputs["from"])
        if cfg.min_pixels is not None or cfg.max_pixels is not None:
            from vlrl.resolution import bounded_checkpoint

            self.base_path = bounded_checkpoint(self.base_path, ctx.dir / "start", cfg.min_pixels, cfg.max_pixels)
        start_path = self.base_path
        if found is not None:
            path, st = found
            self.start, self.cursor, self.kl_coef = st["step"], st["cursor"], st["kl_coef"]
            start_path = path / "policy"
            set_rng_state(st["rng"])
            ctx.console.print(f"[yellow]resuming[/] rl at step {self.start} (prompt cursor {self.cursor})")
        self.version = self.start  # policy version of the trainer's weights (= completed steps)
        self.processor = load_processor(start_path)
        if cfg.algo.guidance.enabled:
            from rlhf.guidance import end_of_turn_id

            self.end_of_turn = end_of_turn_id(self.processor)
        self.length_warning = self._check_length_budget()
        if self.length_warning:
            ctx.console.print(f"[yellow]warning:[/] {escape(self.length_warning)}", highlight=False)
        suppress = input_only_ids(self.processor) if cfg.rollout.suppress_input_tokens else ()
        self.started_ray = start_ray(cfg.ray) if cfg.placement != "inline" else False
        try:
            self._start_workers(start_path, found[0] if found else None, reward_cfg, suppress)
        except BaseException:
            self.close()  # stop what was started (actors, Ray) before reporting
            raise

    def _check_length_budget(self) -> str | None:
        """A prompt whose reference response is longer than the rollout cap can only be
        answered by skipping steps the model was taught; with `mask_truncated` its
        responses carry no gradient at all. Said once at the start (the tiny recipe's
        RL drew difficulty 4-5 prompts needing 62 tokens at max_tokens 48)."""
        from vlrl.eval import describe_over_budget, over_budget_cells

        roll = self.cfg.rollout
        cap = max([m.max_tokens for m in roll.modes] or [roll.max_tokens])
        records = [self.dataset.records[i] for i in self.curriculum.reachable()]
        cells, longest = over_budget_cells(records, self.processor.tokenizer, cap)
        if not cells:
            return None
        setting = "rollout.modes[].max_tokens" if roll.modes else "rollout.max_tokens"
        return f"stages.{self.ctx.name}: " + describe_over_budget(cells, len(records), cap, setting, longest, what="prompts")

    def _start_workers(self, start_path, checkpoint, reward_cfg, suppress: tuple[int, ...]) -> None:
        ctx, cfg, device = self.ctx, self.cfg, self.ctx.device
        threads = ctx.recipe.threads or os.cpu_count()
        ranks = cfg.trainer_ranks
        # Colocated on an accelerator, the engines sleep (weights offloaded, KV cache freed)
        # while the trainer works; on CPU there is nothing to free.
        self.swap_engines = cfg.placement == "colocate" and device.kind != "cpu"
        roles = {"rollout": cfg.rollout.workers}
        if cfg.placement == "split":
            roles.update(trainer=ranks, reward=1, reference=ranks * int(cfg.use_reference))
        check_resources(device, cfg.placement, roles)
        # Several trainer ranks colocated on accelerators: one device per rank, shared in
        # turns by that rank's trainer, reference and rollout worker(s).
        self.bundles = rank_bundles(device, ranks) if cfg.placement == "colocate" else None
        # Rollout actors first: Ray brings them up in the background while the trainer loads
        # here. They load the stage's input (version 0) and get resumed weights below.
        self.pool = make_rollout_pool(
            cfg.rollout, cfg.placement, device, str(self.base_path), threads=threads,
            current_weights=self._full_weights, retries=cfg.rollout_retries, suppress=suppress, bundles=self.bundles, ranks=ranks,
        )
        common = dict(
            device=device.kind, temperature=cfg.rollout.temperature, micro_batch_size=cfg.micro_batch_size, threads=threads, suppress=suppress,
            dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing,
        )
        policy = dict(algo=cfg.algo, optim=cfg.optim, trainable=cfg.trainable)
        where = "split" if cfg.placement == "split" else "inline"  # colocate: in this process
        if ranks > 1:  # FSDP2: each rank its own actor, whatever the placement
            common["threads"] = max(1, threads // ranks) if device.kind == "cpu" else threads
            self.trainer = spawn_ranks(PolicyTrainer, ranks, cfg.placement, device, "trainer", str(start_path), bundles=self.bundles, **policy, **common)
            self.reference = (
                spawn_ranks(ReferenceWorker, ranks, cfg.placement, device, "reference", str(self.base_path), bundles=self.bundles, **common)
                if cfg.use_reference else None
            )
        else:
            self.trainer = spawn(PolicyTrainer, where, device, "trainer", str(start_path), **policy, **common)
            self.reference = spawn(ReferenceWorker, where, device, "reference", str(self.base_path), **common) if cfg.use_reference else None
        if checkpoint is not None:
            self.trainer.load_optimizer(checkpoint / "optimizer.pt")
        self.rewards = spawn(RewardWorker, where, device, "reward", reward_cfg)
        self.pool.wait_ready()
        self.store = RolloutStore.in_dir(ctx.dir)
        dropped = self.store.discard_after(self.start - 1)
        if dropped:
            ctx.console.print(f"[dim]rollout store: dropped {dropped} rows of steps >= {self.start} (replayed now)[/]")
        if self.start > 0:
            self.pool.sync(self._weights(full=True), self.start)
        self.tracker = ctx.tracker()

    # -- weights -----------------------------------------------------------------
    def _weights(self, full: bool = False) -> Any:
        """What a sync sends: tensors (inline), packed numpy (colocate) or an object ref (split)."""
        if self.placement == "inline":
            return self.trainer.all_weights() if full else self.trainer.trained_weights()
        if self.placement == "split" or self.cfg.trainer_ranks > 1:
            return self.trainer.submit("packed", full)  # an object ref: the trainer put it in the store
        return self.trainer.packed(full)

    def _full_weights(self) -> tuple[Any, int]:
        return self._weights(full=True), self.version

    # -- one step -------------------------------------------------------------------
    def step(self, s: int) -> dict[str, float]:
        cfg, timer = self.cfg, Timer()
        t0 = time.perf_counter()
        groups, rounds, sampling = self._collect(s, timer)
        if self.swap_engines:
            with timer("sync"):
                self.pool.sleep()  # the engines' device memory goes to the trainer until the sync
        kept = [g for g in groups if g.kept]
        rows = [(g, c, res) for g in kept for c, res in g.trained]  # (B,) the samples of each kept group, then its guide
        with timer("prepare"):
            batch = build_policy_batch(
                [g.request for g in kept], [k for k, g in enumerate(kept) for _ in g.trained], [c for _, c, _ in rows], self.processor
            )
            scores = torch.tensor([res.total for _, _, res in rows], dtype=torch.float32)  # (B,)
        hybrid: dict[str, float] = {}
        if cfg.algo.visual.enabled:
            with timer("visual"):
                scores, hybrid = self._visual(batch, rows, scores)
        with timer("prepare"):
            token_rewards = A.outcome_to_token_rewards(scores, batch.response_mask)  # before truncation masking
            mask, trunc = A.mask_truncated(batch.response_mask, [c.finish_reason for _, c, _ in rows], cfg.algo.mask_truncated)
            batch.response_mask = mask
            adv, _, adv_metrics = A.compute_advantages(
                token_rewards, mask, [g.gid for g, _, _ in rows], cfg.algo.advantage, reward_components=self._components(rows)
            )
        perception = None
        if cfg.algo.perception_anchor.kl_coef > 0:
            from rlhf.perception import anchor_rows

            perception = anchor_rows([self.dataset.records[g.record_index].family for g, _, _ in rows])  # (B,)
        anchored = perception is not None and bool(perception.any())
        ref = None
        if self.reference is not None:
            with timer("reference"):
                ref = self._reference_logprobs(batch, perception)
        learn = A.has_learning_signal(adv, mask) or self.kl_coef > 0 or cfg.algo.entropy.coef > 0 or anchored
        train = {"actor/skipped": 0.0 if learn else 1.0}
        if learn:
            with timer("train"):
                extra_kw = {"perception_rows": perception} if anchored else {}
                if cfg.algo.guidance.shaping is not None:
                    extra_kw["guide_rows"] = torch.tensor([float(c is g.guide) for g, c, _ in rows])  # (B,)
                train.update(
                    self.trainer.update(batch, adv, ref_logprobs=ref, kl_coef=self.kl_coef, lr=lr_at(s, cfg.steps, cfg.optim), step=s, **extra_kw)
                )
        with timer("sync"):  # an update-free step still moves the version: the weights of version s+1 are those of s
            if self.swap_engines:
                self.pool.wake()
            self.pool.sync(self._weights() if learn else {}, s + 1)
            self.version = s + 1
        with timer("store"):
            self.store.append(self._rows(s, groups, adv, mask))
        self.last_answers = self._answer_pairs(groups)
        self.last_first_steps = self._first_step_pairs(groups)
        self.last_failures = [r.failures for g in groups for r in g.results]
        metrics = self._metrics(s, groups, kept, batch, train, adv_metrics, {**trunc, **sampling, **hybrid}, timer, rounds)
        metrics["time/step"] = time.perf_counter() - t0
        self.kl_coef = A.next_kl_coef(cfg.algo.kl, s + 1, self.kl_coef, train.get("actor/kl_loss"), batch.rows, cfg.steps)
        return metrics

    def _reference_logprobs(self, batch, perception: torch.Tensor | None) -> torch.Tensor:
        """(B, R) reference logprobs on the rows a loss term reads. With no KL term this step
        the perception anchor is the only reader, and it reads perception rows only: the
        reference forward skips the rest (their entries stay 0, read by nothing), which
        is most of the batch and its longest rows."""
        if self.kl_coef > 0 or perception is None:
            return self.reference.logprobs(batch)
        rows = perception.nonzero().flatten()
        ref = torch.zeros(batch.rows, batch.response_width)
        if len(rows):
            ref[rows] = self.reference.logprobs(batch.select(rows))
        return ref

    def _visual(self, batch, rows, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The implicit perception term (rlhf/perception.py): the dependency of each response
        on its image, its capped bonus added to the scores when coef > 0, and the metrics."""
        from rlhf.perception import dependency_metrics, sequence_dependency, visual_bonus

        vc = self.cfg.algo.visual
        real, masked, ent = self.trainer.visual_logprobs(batch)  # (B, R) each
        mask = batch.response_mask
        dep = sequence_dependency(real, masked, mask, vc.per)  # (B,)
        seq_ent = (ent * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,) mean token entropy
        has_image = torch.tensor([bool(g.request.images) for g, _, _ in rows])
        bonus = None
        if vc.coef > 0:
            correct = torch.tensor([bool(res.correct) for _, _, res in rows]) if vc.correct_only else None
            bonus = visual_bonus(dep, vc.coef, vc.cap, correct, seq_ent, vc.min_entropy) * has_image
            scores = scores + bonus
        return scores, dependency_metrics(dep, has_image, bonus, vc.cap)

    def _collect(self, s: int, timer: Timer) -> tuple[list[Group], int, dict[str, float]]:
        """Prompts -> groups with rewards; DAPO dynamic sampling draws more rounds while
        groups with equal rewards are dropped (all are kept without it)."""
        cfg, ds = self.cfg, self.cfg.algo.dynamic_sampling
        want = cfg.rollout.prompts_per_step
        every: list[Group] = []
        kept: list[Group] = []
        sampling: dict[str, float] = {}
        rounds = ds.max_rounds if ds.enabled else 1
        for r in range(rounds):
            groups = self._generate(s, r, timer)
            with timer("reward"):
                self._score(groups)
                if cfg.algo.guidance.enabled:
                    self._guide(groups)
            every += groups
            if not ds.enabled:
                return every, 1, sampling
            filt = A.filter_groups([g.gid for g in groups for _ in g.trained], [x.total for g in groups for _, x in g.trained], ds.tolerance)
            for g in groups:
                g.kept = g.gid in set(filt.kept_groups)
            for k, v in filt.metrics.items():
                sampling[k] = sampling.get(k, 0.0) + v if k != "sampling/kept_group_frac" else v
            kept, full = A.fill_batch(kept, [g for g in groups if g.kept], want)
            if full:
                break
        ids = {g.gid for g in kept}
        for g in every:
            g.kept = g.gid in ids
        if not kept:  # nothing to learn from after every round: train on the last round (all advantages 0)
            for g in every[-want:]:
                g.kept = True
        sampling["sampling/rounds"] = float(r + 1)
        return every, r + 1, sampling

    def _generate(self, s: int, r: int, timer: Timer) -> list[Group]:
        cfg = self.cfg.rollout
        first = self.cursor
        idx = self.curriculum.draw(first, cfg.prompts_per_step, s)
        self.cursor += len(idx)
        requests = []
        for k, i in enumerate(idx):
            sample = self.dataset[i]
            requests.append(GenerationRequest.from_sample(sample, request_id=f"{s}-{first + k}"))
        seed = (self.seed * 1_000_003 + s * 1_009 + r) % 2**31
        if not cfg.modes:
            params = SamplingParams(
                n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_tokens, seed=seed,
            )
            with timer("generate"):
                out, stats = self.pool.generate(requests, params, min_version=s)
            timer.seconds["generate_tokens"] += stats["tokens"]
            return [Group(gid=req.request_id, record_index=i, request=req, completions=comps, results=[]) for req, i, comps in zip(requests, idx, out)]
        from rlhf.modes import pick_mode, with_suffix

        picks = [pick_mode(self.seed, first + k, [m.weight for m in cfg.modes]) for k in range(len(idx))]
        requests = [with_suffix(req, cfg.modes[m].suffix) for req, m in zip(requests, picks)]
        out: list = [None] * len(requests)
        for m, mode in enumerate(cfg.modes):  # one generate call per mode: each has its own length cap
            ks = [k for k, p in enumerate(picks) if p == m]
            if not ks:
                continue
            params = SamplingParams(
                n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=mode.max_tokens,
                seed=(seed + 7_919 * m) % 2**31,
            )
            with timer("generate"):
                got, stats = self.pool.generate([requests[k] for k in ks], params, min_version=s)
            timer.seconds["generate_tokens"] += stats["tokens"]
            for k, comps in zip(ks, got):
                out[k] = comps
        return [
            Group(gid=req.request_id, record_index=i, request=req, completions=comps, results=[], mode=cfg.modes[m].name)
            for req, i, comps, m in zip(requests, idx, out, picks)
        ]

    def _score(self, groups: list[Group]) -> None:
        from rewards.api import RewardSample
        from vlrl.model.batching import chat_dicts

        samples = []
        for g in groups:
            rec = self.dataset.records[g.record_index]
            images = [str(self.data_file.parent / p) if isinstance(p, str) and not os.path.isabs(p) else p for p in rec.images]
            prompt, reference = chat_dicts(rec.prompt_messages()), rec.target_text()
            for c in g.completions:
                samples.append(
                    RewardSample(
                        response=c.text, prompt=prompt, answer=rec.answer, reference=reference, task=rec.task, difficulty=rec.difficulty, meta=rec.meta,
                        response_ids=c.token_ids, finish_reason=c.finish_reason, images=images, group_id=g.gid, rewards=rec.rewards, id=rec.id,
                    )
                )
        results, self._reward_stack_metrics = self.rewards.score(samples)
        k = 0
        for g in groups:
            g.results = results[k : k + len(g.completions)]
            k += len(g.completions)

    def _guide(self, groups: list[Group]) -> None:
        """Give each group that needs it the record's reference solution as one more
        member, scored by the same reward stack (rlhf/guidance.py)."""
        from rlhf.guidance import needs_guidance, reference_completion

        when = self.cfg.algo.guidance.when
        guided = []
        for g in groups:
            reference = self.dataset.records[g.record_index].target_text()
            if not reference or not needs_guidance(g.results, when):
                continue
            c = g.completions[-1]
            g.guide = reference_completion(
                reference, tokenizer=self.processor.tokenizer, stop_id=self.end_of_turn, request_id=c.request_id,
                sample_index=len(g.completions), prompt_tokens=c.prompt_tokens, policy_version=c.policy_version,
            )
            guided.append(g)
        alone = [Group(gid=g.gid, record_index=g.record_index, request=g.request, completions=[g.guide], results=[]) for g in guided]
        if alone:
            self._score(alone)  # the stack scores whole groups: the reference as a group of its own
        for g, a in zip(guided, alone):
            g.guide_result = a.results[0]

    def _components(self, rows) -> dict[str, list[float]] | None:
        names = self.cfg.algo.advantage.gdpo_components
        if not names:
            return None
        return {n: [float(res.components.get(n) or 0.0) for _, _, res in rows] for n in names}

    # -- outputs --------------------------------------------------------------------
    def _rows(self, s: int, groups: list[Group], adv: torch.Tensor, mask: torch.Tensor) -> list[RolloutRow]:
        seq_adv = ((adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()  # (B,) token mean per kept row
        base = self.ctx.dir.parent
        out, b = [], 0
        for g in groups:
            rec = self.dataset.records[g.record_index]
            images = [os.path.relpath(self.data_file.parent / p, base) for p in rec.images if isinstance(p, str)]
            for c, res in g.trained:
                a = None
                if g.kept:
                    a, b = seq_adv[b], b + 1
                comps = {k: (v if v is None or math.isfinite(v) else None) for k, v in res.components.items()}
                out.append(
                    RolloutRow(
                        run=self.ctx.recipe.name, stage=self.ctx.name, step=s, policy_version=c.policy_version, group_id=g.gid,
                        sample_index=c.sample_index, record_id=rec.id, task=rec.task, difficulty=rec.difficulty, prompt=list(g.request.messages),
                        images=images, answer=rec.answer, response=c.text, response_tokens=len(c.token_ids), finish_reason=c.finish_reason,
                        status=RolloutStatus.truncated if c.finish_reason == "length" else RolloutStatus.ok,
                        error="; ".join(f"{k}: {v}" for k, v in res.failures.items())[:400] or None,
                        components=comps, total_reward=res.total if math.isfinite(res.total) else 0.0, advantage=a,
                        meta={"correct": res.correct, "kept": g.kept, **({"guided": True} if c is g.guide else {})},
                    )
                )
        return out

    def _answer_pairs(self, groups: list[Group]) -> dict[str, list[tuple[str | None, str | None]]]:
        """Per task, (response answer, reference answer) of every completion, as AnswerCollapseWatch compares them."""
        from vlrl.answers import answer_type_for

        out: dict[str, list[tuple[str | None, str | None]]] = defaultdict(list)
        for g in groups:
            rec = self.dataset.records[g.record_index]
            if rec.answer is None:
                continue
            kind = answer_type_for(rec.task, rec.meta)
            ref = answer_key(rec.answer, kind)
            out[rec.task] += [(answer_key(c.text, kind), ref) for c in g.completions]
        return dict(out)

    def _first_step_pairs(self, groups: list[Group]) -> dict[str, list[tuple[str | None, str]]]:
        """Per task, (response's first computation, reference's) of every completion whose
        record's reference shows a computation, as FirstStepCollapseWatch compares them."""
        out: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
        for g in groups:
            rec = self.dataset.records[g.record_index]
            ref = first_step_key(rec.target_text() or "")
            if ref is not None:
                out[rec.task] += [(first_step_key(c.text), ref) for c in g.completions]
        return dict(out)

    def _metrics(self, s, groups, kept, batch, train, adv_metrics, extra, timer: Timer, rounds: int) -> dict[str, float]:
        results = [x for g in groups for x in g.results]
        comps = [c for g in groups for c in g.completions]
        m: dict[str, float] = {k: v for k, v in getattr(self, "_reward_stack_metrics", {}).items() if k.endswith(("fail_count", "none_count", "correct_rate"))}
        by_name: dict[str, list[float]] = defaultdict(list)
        for res in results:
            by_name["total"].append(res.total)
            for k, v in res.components.items():
                if v is not None and math.isfinite(v):
                    by_name[k].append(v)
        for k, vals in by_name.items():
            t = torch.tensor(vals, dtype=torch.float64)
            m[f"reward/{k}/mean"], m[f"reward/{k}/std"] = float(t.mean()), float(t.std(unbiased=False))
        acc: dict[str, list[bool]] = defaultdict(list)
        for g in groups:
            task = self.dataset.records[g.record_index].task
            for res in g.results:
                if res.correct is not None:
                    acc[task].append(res.correct)
                    acc["all"].append(res.correct)
        m.update({f"acc/{t}": sum(v) / len(v) for t, v in acc.items()})
        m.update({f"answers/top_share/{t}": top_share([r for r, _ in pairs])[1] for t, pairs in self.last_answers.items()})
        m.update({f"steps/top_share/{t}": top_share([r for r, _ in pairs])[1] for t, pairs in self.last_first_steps.items()})
        lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float64)
        m.update({"response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
                  "response/stop_frac": sum(c.finish_reason == "stop" for c in comps) / len(comps)})
        from rlhf.diversity import diversity_metrics

        m.update(diversity_metrics([[c.token_ids for c in g.completions] for g in groups], [[c.text for c in g.completions] for g in groups]))
        if self.cfg.rollout.modes:
            from rlhf.modes import mode_metrics

            per = [(g.mode, c, r) for g in groups for c, r in zip(g.completions, g.results)]
            m.update(mode_metrics(
                [md.name for md in self.cfg.rollout.modes], [p[0] for p in per], [len(p[1].token_ids) for p in per],
                [p[2].correct for p in per], [p[1].finish_reason == "stop" for p in per],
            ))
        if self.cfg.algo.guidance.enabled:
            guided = [g for g in groups if g.guide is not None]
            m["guidance/groups"] = float(len(guided))
            m["guidance/kept_groups"] = float(sum(g.kept for g in guided))
            if guided:
                m["guidance/reference_correct"] = sum(bool(g.guide_result.correct) for g in guided) / len(guided)
        m.update(adv_metrics)
        m.update(extra)
        m.update(train)
        sec = timer.seconds
        m["perf/rollout_tokens"] = sec.pop("generate_tokens", 0.0)
        m["perf/rollout_tokens_per_s"] = m["perf/rollout_tokens"] / sec["generate"] if sec.get("generate") else 0.0
        for k in ("generate", "reward", "reference", "visual", "train", "sync", "prepare", "store"):
            m[f"time/{k}"] = sec.get(k, 0.0)
        lo, hi = self.curriculum.band(s)
        m.update({
            "policy/version": float(s + 1), "rollout/min_version": float(s), "rollout/restarts": float(self.pool.restarts),
            "rollout/prompts": float(len(groups)), "rollout/kept_prompts": float(len(kept)), "rollout/samples": float(len(comps)),
            "rollout/prompt_tokens_mean": sum(c.prompt_tokens for c in comps) / max(len(comps), 1),
            "rollout/prompt_tokens_max": float(max((c.prompt_tokens for c in comps), default=0)),
            "curriculum/difficulty_lo": float(lo), "curriculum/difficulty_hi": float(hi), "curriculum/cursor": float(self.cursor),
            "curriculum/perception_frac": sum(self.dataset.records[g.record_index].family == "perception" for g in groups) / len(groups),
            "actor/kl_coef": float(self.kl_coef), "batch/rows": float(batch.rows),
        })
        return m

    def checkpoint(self, step: int, complete: bool = False) -> None:
        state = {"step": step, "cursor": self.cursor, "kl_coef": self.kl_coef, "version": step, "complete": complete, "rng": rng_state()}
        self.trainer.save_checkpoint(self.state_dir, state)

    def close(self) -> None:
        closers = [lambda: self.tracker.close(), lambda: self.store.close(), lambda: self.rewards.close(), lambda: self.pool.close()]
        closers += [lambda w=w: w.kill() for w in (getattr(self, "trainer", None), getattr(self, "reference", None)) if isinstance(w, RankGroup)]
        for closer in closers:
            try:
                closer()
            except Exception:  # noqa: BLE001 - teardown must not hide the stage's own error
                pass
        if self.started_ray:
            stop_ray()


def _progress(console) -> Progress:
    return Progress(
        TextColumn("[bold]rl"), BarColumn(), MofNCompleteColumn(), TextColumn("reward {task.fields[reward]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} rollout tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False,
    )


def run_stage(ctx) -> dict:
    cfg: RlStage = ctx.config
    final = ctx.checkpoint_dir
    found = read_checkpoint(ctx.dir / "state")
    if found is not None and found[1].get("complete"):
        if not (final / "config.json").is_file():
            shutil.copytree(found[0] / "policy", final)
        ctx.console.print(f"[dim]rl already trained ({found[1]['step']} steps); checkpoint at {final}[/]")
        points = read_curve(ctx.dir)
        curve = {"heldout_curve": curve_summary(points)} if points else {}
        return {"steps": found[1]["step"], **curve}
    ctl = None
    # before any worker starts: a curve without eval data is a recipe error, said at once
    curve = HeldoutCurve(ctx, cfg.eval_every, cfg.eval_limit, cfg.steps) if cfg.eval_every else None
    try:
        ctl = Controller(ctx, cfg)
        if curve is not None:
            curve.resume(ctl.start)
        last: dict[str, float] = {}
        warnings: list[str] = [ctl.length_warning] if ctl.length_warning else []
        watch = TruncationWatch(
            masked=cfg.algo.mask_truncated, penalised=length_is_penalised(cfg.reward_terms, cfg.rewards), max_tokens=cfg.rollout.max_tokens
        )
        collapse = AnswerCollapseWatch(route=functools.partial(route_fns, cfg.rewards))
        step_collapse, failing = FirstStepCollapseWatch(), RewardFailureWatch()
        modes = ModeLengthWatch({m.name: m.max_tokens for m in cfg.rollout.modes})
        with _progress(ctx.console) as progress:
            task = progress.add_task("rl", total=cfg.steps, completed=ctl.start, reward=math.nan, tps=0.0)
            if curve is not None and curve.wants(ctl.start):
                progress.console.print(describe_point(curve.take(ctl.start, ctl.trainer.save_pretrained, ctl.tracker)))
            for s in range(ctl.start, cfg.steps):
                last = ctl.step(s)
                ctl.tracker.log(last, step=s + 1)
                found = [
                    watch.update(s + 1, last.get("batch/truncated_frac")),
                    *collapse.update(s + 1, ctl.last_answers),
                    *step_collapse.update(s + 1, ctl.last_first_steps),
                    *failing.update(s + 1, ctl.last_failures),
                    modes.update(s + 1, last),
                ]
                for warning in filter(None, found):
                    warnings.append(warning)
                    progress.console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
                progress.update(task, completed=s + 1, reward=last.get("reward/total/mean", math.nan), tps=last["perf/rollout_tokens_per_s"])
                if curve is not None and curve.wants(s + 1):
                    progress.console.print(describe_point(curve.take(s + 1, ctl.trainer.save_pretrained, ctl.tracker)))
                if (s + 1) % cfg.checkpoint_every == 0 and s + 1 != cfg.steps:
                    ctl.checkpoint(s + 1)
        ctl.trainer.save_pretrained(final)
        ctl.checkpoint(cfg.steps, complete=True)
        ctx.console.print(f"rl checkpoint: {final} ({cfg.steps} steps, {ctl.pool.restarts} rollout worker restart(s))")
        groups, records = ctl.store.prompt_reuse()
        ctx.console.print(f"prompts sampled: {groups:,} groups from {records:,} distinct records ({groups / max(records, 1):.1f} per record)")
        summary = {"steps": cfg.steps, "reward_mean": last.get("reward/total/mean"), "rollout_restarts": ctl.pool.restarts,
                   "prompts": {"groups": groups, "distinct_records": records}}
        if curve is not None and curve.points:
            ctx.console.print(curve_table(curve.points))
            summary["heldout_curve"] = curve_summary(curve.points)
        return {**summary, "warnings": warnings} if warnings else summary
    finally:
        if ctl is not None:
            ctl.close()

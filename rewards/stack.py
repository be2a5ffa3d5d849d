"""The hybrid combiner: one entry point that scores a whole batch of responses.

    stack = RewardStack.from_config(cfg)          # cfg: RewardStackConfig or its dict
    results = stack.score(samples)                # list[RewardSample] -> list[RewardResult]
    stack.metrics()                               # {"reward/<name>/mean": ..., ...}

Per sample, in this order:

1. Route: the record's `rewards` list, else `routing[task]`, else `default_route`; plus
   `always`. A routed name is a component or a gate.
2. Score every routed component that does not need scores, and each routed gate's rule.
   Isolated plugins (rule rewards) run in the process pool; others in-process, async
   ones concurrently on one event loop.
3. Gates: the rule's verdict where it decided (a value, not None, not failed); the
   model is called only for the samples where it did not.
4. Standardise model scores within each group when asked (MiniCPM-V 4.5 adds
   0.5 x the group-standardised reward-model score); the raw value stays as `<name>/raw`.
5. Correctness: True when a component with `correct_at` reaches it.
6. Score the `needs_scores` components (length and diversity terms).
7. total = sum of weight x value over the routed components and gates; a gate's inputs
   count through the gate only. A failed component contributes its fallback.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlrl.errors import DataError, RecipeError, validation_line

from rewards.api import Bounds, PluginError, RewardSample, RewardSpec, check_bounds
from rewards.execute import ComponentDef, failure, run_call, run_call_async
from rewards.pool import Call, CallOutcome, PoolStats, WorkerPool
from rewards.registry import REGISTRY, Registry, plugin_ref

# --------------------------------------------------------------------------------------
# Config


class ComponentConfig(BaseModel):
    """One reward component of the stack."""

    model_config = ConfigDict(extra="forbid")

    fn: str  # the plugin: registered name, module:function, path/to/file.py:function, or entry point
    weight: float = 1.0  # multiplies the value in the total
    args: dict[str, Any] = Field(default_factory=dict)  # options passed to the plugin (checked at load)
    timeout: float | None = None  # seconds per call (a batched plugin's call is one batch); None = stack timeout
    fallback: float | None = None  # value used when the component fails; None = stack fallback
    isolate: bool | None = None  # run in the process pool; None = the plugin's default
    standardize: bool | None = None  # z-score within the group; None = stack flag for model plugins
    correct_at: float | None = None  # value that marks the sample correct; None = the plugin's default
    bounds: Bounds | None = None  # [lo, hi] a value must lie in (null: unbounded side); None = the plugin's declared bounds
    batch_size: int = Field(default=32, ge=1)  # samples per call for batched plugins
    sub_weights: dict[str, float] = Field(default_factory=dict)  # weights of named sub-components (default 1)

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be a finite number")
        return v

    @field_validator("bounds", mode="before")
    @classmethod
    def _bounds(cls, v: Any) -> Any:
        return None if v is None else check_bounds(v)


class GateConfig(BaseModel):
    """Confidence gating: the rule's verdict where it can decide, the model's score where it cannot."""

    model_config = ConfigDict(extra="forbid")

    rule: str  # component name; None / failure from it means "cannot decide"
    model: str  # component name; asked only for the samples the rule left undecided
    weight: float = 1.0
    model_correct_at: float | None = None  # a model score at or above this is "correct"; None = unknown
    # (where the rule decided, the rule's own correct_at applies)


DEFAULT_COMPONENTS: dict[str, dict] = {
    "math_accuracy": {"fn": "math_accuracy"},
    "exact_match": {"fn": "exact_match"},
    "ocr_similarity": {"fn": "ocr_similarity"},
    "counting": {"fn": "counting"},
    "iou": {"fn": "iou"},
    "answer_match": {"fn": "answer_match"},
    "format": {"fn": "format", "weight": 0.2},
}

# The synthetic task world's tasks -> components (used when a record has no `rewards`).
DEFAULT_ROUTING: dict[str, list[str]] = {
    "read_digits": ["exact_match", "format"],  # leading zeros matter: exact
    "read_word": ["ocr_similarity", "format"],  # partial credit for near reads
    "shape_color": ["exact_match", "format"],
    "shape_position": ["exact_match", "format"],
    "text_fact": ["exact_match", "format"],
    "count_shapes": ["counting", "format"],
    "arith": ["math_accuracy", "format"],
    "word_problem": ["math_accuracy", "format"],
    "text_arith": ["math_accuracy", "format"],
    "bbox": ["iou", "format"],
}
DEFAULT_ROUTE = ["answer_match", "format"]


class RewardStackConfig(BaseModel):
    """The `rewards:` section of a recipe.

    Leaving out `components` gives the built-in accuracy + format stack routed by task.
    Giving `components` without `routing` applies every component to every record
    (unless a record's own `rewards` list says otherwise)."""

    model_config = ConfigDict(extra="forbid")

    components: dict[str, ComponentConfig] = Field(default_factory=lambda: {k: ComponentConfig(**v) for k, v in DEFAULT_COMPONENTS.items()})
    gates: dict[str, GateConfig] = Field(default_factory=dict)  # gate name -> gate
    routing: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_ROUTING.items()})
    default_route: list[str] | None = Field(default_factory=lambda: list(DEFAULT_ROUTE))  # None = every component
    always: list[str] = Field(default_factory=list)  # added to every record's route (length / diversity terms)
    fallback: float = 0.0  # value of a failed component
    timeout: float = Field(default=5.0, gt=0)  # seconds per call
    workers: int = Field(default=2, ge=0)  # pool processes; 0 = run isolated plugins in-process, where a stuck call cannot be stopped
    start_method: Literal["spawn", "forkserver"] = "spawn"
    worker_memory_mb: int | None = Field(default=4096, ge=256)  # address-space cap per worker; None = none
    standardize_model_scores: bool = False  # z-score model components within their group (MiniCPM-V 4.5)
    standardize_eps: float = 1e-6

    @classmethod
    def parse(cls, cfg: Any, where: str = "rewards") -> "RewardStackConfig":
        """`cfg` validated, or a one-line RecipeError naming the first bad key under `where`
        (pydantic's own message is a dozen lines with links)."""
        try:
            return cls.model_validate(cfg)
        except ValidationError as e:
            errs = e.errors()
            raise RecipeError(validation_line(errs, where + "".join(f".{x}" for x in errs[0]["loc"]))) from None

    def with_base_dir(self, base_dir: str | Path) -> "RewardStackConfig":
        """A copy where relative `file.py:function` plugins point into `base_dir` (a recipe's
        folder) when the file is there; other entries are unchanged."""
        comps = {}
        for name, c in self.components.items():
            where, sep, fn = c.fn.rpartition(":")
            if sep and where.endswith(".py") and not Path(where).is_absolute() and (Path(base_dir) / where).is_file():
                c = c.model_copy(update={"fn": f"{Path(base_dir) / where}:{fn}"})
            comps[name] = c
        return self.model_copy(update={"components": comps})

    def check_plugins(self, registry: Registry | None = None) -> dict[str, RewardSpec]:
        """Every component's plugin found, imported and its options checked, without calling it
        or starting anything: `vlrl validate` and `vlrl run` do this before any stage starts, so
        a typo in a plugin's name or file does not wait for the stages ahead of RL to finish.
        Class plugins are built (the contract keeps their __init__ cheap): it checks their
        option values."""
        specs = {}
        for name, cc in self.components.items():
            try:
                specs[name] = (registry or REGISTRY).resolve(cc.fn)
                specs[name].check_args(cc.args)
                closer = getattr(specs[name].make_callable(cc.args), "close", None)
            except PluginError as e:
                raise RecipeError(f"rewards.components.{name}: {e}") from e
            if callable(closer):
                closer()
        return specs

    @field_validator("components", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict):  # `name: fn` is short for `name: {fn: fn}`
            return {k: ({"fn": x} if isinstance(x, str) else x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _check(self) -> "RewardStackConfig":
        if "components" in self.model_fields_set:
            if "routing" not in self.model_fields_set:
                self.routing = {}
            if "default_route" not in self.model_fields_set:
                self.default_route = None
        names = set(self.components) | set(self.gates)
        clash = set(self.components) & set(self.gates)
        if clash:
            raise ValueError(f"names used for both a component and a gate: {sorted(clash)}")
        for gname, g in self.gates.items():
            for role in ("rule", "model"):
                if getattr(g, role) not in self.components:
                    raise ValueError(f"gates.{gname}.{role}: no component named {getattr(g, role)!r}; components are {sorted(self.components)}")
        for where, route in [*(("routing." + t, r) for t, r in self.routing.items()), ("default_route", self.default_route or []), ("always", self.always)]:
            bad = [n for n in route if n not in names]
            if bad:
                raise ValueError(f"{where}: unknown component(s) {bad}; known: {sorted(names)}")
        return self


# --------------------------------------------------------------------------------------
# Results


@dataclass
class RewardResult:
    """The reward of one sample, with the parts the trainer logs."""

    total: float
    components: dict[str, float | None]  # value per routed component (fallback if it failed; None = not applicable)
    contributions: dict[str, float]  # weight x value of what makes up `total`
    failures: dict[str, str] = field(default_factory=dict)  # component -> cause
    timings: dict[str, float] = field(default_factory=dict)  # component -> seconds spent on this sample
    correct: bool | None = None


def summarize(results: list[RewardResult], extra: dict[str, float] | None = None) -> dict[str, float]:
    """Namespaced metrics of a batch of results (glossary in docs/metrics-rewards.md)."""
    m: dict[str, float] = {}
    if not results:
        return dict(extra or {})
    totals = [r.total for r in results]
    m["reward/total/mean"] = sum(totals) / len(totals)
    m["reward/total/std"] = _std(totals)
    names = sorted({k for r in results for k in r.components} | {k for r in results for k in r.failures})
    for name in names:
        vals = [r.components[name] for r in results if name in r.components and name not in r.failures and r.components[name] is not None]
        if vals:  # no key rather than NaN when nothing had a value
            m[f"reward/{name}/mean"] = sum(vals) / len(vals)
        m[f"reward/{name}/fail_count"] = float(sum(1 for r in results if name in r.failures))
        m[f"reward/{name}/none_count"] = float(sum(1 for r in results if name in r.components and r.components[name] is None))
        m[f"reward/{name}/time_s"] = sum(r.timings.get(name, 0.0) for r in results)
    known = [r.correct for r in results if r.correct is not None]
    if known:
        m["reward/correct_rate"] = sum(known) / len(known)
    m["reward/fail_count"] = float(sum(1 for r in results if r.failures))
    m.update(extra or {})
    return m


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))


# --------------------------------------------------------------------------------------
# The stack


@dataclass
class _Component:
    name: str
    spec: RewardSpec
    cfg: ComponentConfig
    defn: ComponentDef
    isolate: bool
    timeout: float
    fallback: float
    correct_at: float | None
    standardize: bool
    local: Any = None  # the in-process callable (built once)


class RewardStack:
    """Scores batches of samples with the configured components; see the module docstring."""

    def __init__(self, config: RewardStackConfig, *, registry: Registry | None = None, context: dict[str, Any] | None = None):
        self.config = config
        self._registry = registry or REGISTRY
        self._context = dict(context or {})
        self.components: dict[str, _Component] = {n: self._load(n, c) for n, c in config.components.items()}
        self.gates = dict(config.gates)
        for gname, g in self.gates.items():
            for role in ("rule", "model"):
                if self.components[getattr(g, role)].spec.needs_scores:
                    raise RecipeError(f"gates.{gname}.{role}: {getattr(g, role)!r} needs scores and cannot be a gate input")
        self._gate_inputs = {n for g in self.gates.values() for n in (g.rule, g.model)}
        pooled = {n: c.defn for n, c in self.components.items() if c.isolate}
        self._pool = (
            WorkerPool(pooled, config.workers, start_method=config.start_method, memory_mb=config.worker_memory_mb)
            if pooled and config.workers > 0
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._last_metrics: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: RewardStackConfig | dict | None = None, *, registry: Registry | None = None, context: dict[str, Any] | None = None) -> "RewardStack":
        """Build a stack from a config (or its dict form); `context` offers objects such as the
        rollout `engine` to class plugins whose __init__ asks for them by name."""
        if cfg is None:
            cfg = RewardStackConfig()
        elif isinstance(cfg, dict):
            cfg = RewardStackConfig.parse(cfg)
        return cls(cfg, registry=registry, context=context)

    # -- loading
    def _load(self, name: str, cc: ComponentConfig) -> _Component:
        try:
            spec = self._registry.resolve(cc.fn)
        except PluginError as e:
            raise RecipeError(f"rewards.components.{name}: {e}") from e
        isolate = spec.isolate if cc.isolate is None else cc.isolate
        args = dict(cc.args)
        if not isolate:  # objects from the caller (e.g. the rollout engine) stay in this process
            args.update({k: v for k, v in self._context.items() if k in spec.options and k not in cc.args})
        try:
            spec.check_args(args)
            local = spec.make_callable(args)  # validates the options of class plugins now
        except PluginError as e:
            raise RecipeError(f"rewards.components.{name}: {e}") from e
        ref = plugin_ref(spec.obj) if isolate else spec.obj
        if isolate and ref is None:
            raise RecipeError(
                f"rewards.components.{name}: {spec.label} is defined where worker processes cannot import it "
                "(inside a function, a lambda, or an interactive session); define it at module level, or set isolate: false"
            )
        defn = ComponentDef(name, ref, args, spec.is_class, spec.is_async, spec.batched, cc.bounds if cc.bounds is not None else spec.bounds)
        standardize = cc.standardize if cc.standardize is not None else (spec.kind == "model" and self.config.standardize_model_scores)
        return _Component(
            name=name,
            spec=spec,
            cfg=cc,
            defn=defn,
            isolate=isolate,
            timeout=cc.timeout or self.config.timeout,
            fallback=self.config.fallback if cc.fallback is None else cc.fallback,
            correct_at=cc.correct_at if cc.correct_at is not None else spec.correct_at,
            standardize=standardize,
            local=local,
        )

    def start(self) -> "RewardStack":
        """Start the worker processes now (they also start on the first score())."""
        if self._pool is not None:
            self._pool.wait_ready()
        return self

    def close(self) -> None:
        """Stop the worker processes, model actors and clients. The stack cannot score after this."""
        if self._pool is not None:
            self._pool.close()
        for comp in self.components.values():
            closer = getattr(comp.local, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception:  # closing must not hide the caller's own error
                    pass
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None

    def __enter__(self) -> "RewardStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pool_stats(self) -> PoolStats:
        return self._pool.stats if self._pool is not None else PoolStats()

    # -- scoring
    def routes(self, sample: RewardSample) -> list[str]:
        cfg = self.config
        route = sample.rewards if sample.rewards is not None else cfg.routing.get(sample.task, cfg.default_route)
        if route is None:
            route = list(self.components)
        known = set(self.components) | set(self.gates)
        bad = [n for n in route if n not in known]
        if bad:
            where = f"record {sample.id!r}" if sample.id else f"a {sample.task!r} sample"
            raise DataError(f"{where} asks for reward component(s) {bad} that the stack does not have; known: {sorted(known)}")
        return list(dict.fromkeys([*route, *cfg.always]))

    def score(self, samples: list[RewardSample]) -> list[RewardResult]:
        """Score a batch, results in input order. Pass all responses of a group (same `group_id`)
        in the same call: groups are formed within a call. One call at a time per stack."""
        with self._lock:
            return self._score(samples)

    def _score(self, samples: list[RewardSample]) -> list[RewardResult]:
        t0 = time.perf_counter()
        before = dataclasses.replace(self.pool_stats)
        work = _with_groups(samples)
        routes = [self.routes(s) for s in work]
        vals: list[dict[str, tuple[Any, str | None, float]]] = [{} for _ in work]

        # 2. components that need no scores, and gate rules
        first: list[set[str]] = []
        for r in routes:
            need = set()
            for n in r:
                if n in self.gates:
                    need.add(self.gates[n].rule)
                elif not self.components[n].spec.needs_scores:
                    need.add(n)
            first.append(need)
        self._run(work, first, vals)

        # 3. gate models, only where the rule could not decide
        second = [set() for _ in work]
        for i, r in enumerate(routes):
            for n in r:
                if n in self.gates:
                    v, err, _ = vals[i][self.gates[n].rule]
                    if err is not None or v is None or (isinstance(v, dict) and all(x is None for x in v.values())):
                        second[i].add(self.gates[n].model)
        self._run(work, second, vals)

        # 4.-5. views for needs_scores plugins
        partial = [self._assemble(i, routes[i], vals[i], work) for i in range(len(work))]
        self._standardize(work, partial)
        for s, p in zip(work, partial):
            s.scores = dict(p.components)
            s.correct = p.correct

        # 6. needs_scores components
        third = [{n for n in r if n in self.components and self.components[n].spec.needs_scores} for r in routes]
        if any(third):
            self._run(work, third, vals)
            partial = [self._assemble(i, routes[i], vals[i], work) for i in range(len(work))]
            self._standardize(work, partial)
        results = [self._finish(p) for p in partial]

        after = self.pool_stats
        elapsed = time.perf_counter() - t0
        extra = {
            "reward/time_s": elapsed,
            "reward/samples_per_s": len(samples) / elapsed if elapsed > 0 else 0.0,
            "reward/pool/timeouts": float(after.timeouts - before.timeouts),
            "reward/pool/crashes": float(after.crashes - before.crashes),
            "reward/pool/restarts": float(after.restarts - before.restarts),
        }
        self._last_metrics = summarize(results, extra)
        return results

    def metrics(self) -> dict[str, float]:
        """Metrics of the last score() call."""
        return dict(self._last_metrics)

    # -- running plugins
    def _run(self, work: list[RewardSample], need: list[set[str]], vals: list[dict]) -> None:
        calls: list[Call] = []
        owners: dict[int, list[int]] = {}
        for comp in self.components.values():
            idxs = [i for i in range(len(work)) if comp.name in need[i]]
            step = comp.cfg.batch_size if comp.spec.batched else 1
            for k in range(0, len(idxs), step):
                part = idxs[k : k + step]
                c = Call(len(calls), comp.name, [work[i] for i in part], comp.timeout)
                calls.append(c)
                owners[c.id] = part
        if not calls:
            return
        outcomes = self._execute(calls)
        # a batch that failed as a whole: retry its samples one by one, so one bad sample costs only itself
        retry = [c for c in calls if outcomes[c.id].whole and len(c.samples) > 1]
        if retry:
            singles, back = [], {}
            for c in retry:
                for j, s in enumerate(c.samples):
                    sc = Call(len(calls) + len(singles), c.component, [s], c.timeout)
                    singles.append(sc)
                    back[sc.id] = (c.id, j)
            again = self._execute(singles)
            for sid, (cid, j) in back.items():
                outcomes[cid].items[j] = again[sid].items[0]
        for c in calls:
            o = outcomes[c.id]
            per = o.elapsed / max(1, len(c.samples))
            for i, (value, err) in zip(owners[c.id], o.items):
                vals[i][c.component] = (value, err, per)

    def _execute(self, calls: list[Call]) -> dict[int, CallOutcome]:
        pooled = [c for c in calls if self.components[c.component].isolate and self._pool is not None]
        local = [c for c in calls if not (self.components[c.component].isolate and self._pool is not None)]
        aio = [c for c in local if self.components[c.component].spec.is_async]
        sync = [c for c in local if not self.components[c.component].spec.is_async]
        watch = _LocalCalls()
        if aio:
            asyncio.run_coroutine_threadsafe(self._run_async(aio, watch), self._event_loop())
        by_comp: dict[str, list[Call]] = collections.defaultdict(list)
        for c in sync:
            by_comp[c.component].append(c)
        for name, cs in by_comp.items():
            threading.Thread(target=self._run_sync, args=(cs, watch), name=f"vlrl-reward-{name}", daemon=True).start()
        out: dict[int, CallOutcome] = self._pool.run(pooled) if pooled else {}
        out.update(self._wait_local(aio, by_comp, watch))
        return out

    def _wait_local(self, aio: list[Call], by_comp: dict[str, list[Call]], watch: "_LocalCalls") -> dict[int, CallOutcome]:
        """The in-process calls' outcomes, none waited for past its timeout (see _LocalCalls)."""
        aio_deadline = watch.t0 + max((c.timeout for c in aio), default=0.0) + _LOCAL_GRACE_S
        pending = {c.id: c for c in aio} | {c.id: c for cs in by_comp.values() for c in cs}
        out: dict[int, CallOutcome] = {}
        with watch.cond:
            while True:
                for cid in [cid for cid in pending if cid in watch.done]:
                    out[cid] = watch.done[cid]
                    del pending[cid]
                if not pending:
                    return out
                now = time.perf_counter()
                if aio and now > aio_deadline and any(c.id in pending for c in aio):
                    for c in aio:
                        if pending.pop(c.id, None) is not None:
                            out[c.id] = CallOutcome(failure(f"timeout: no result within {c.timeout:g}s; {_BLOCKED_LOOP}", len(c.samples)), c.timeout, False)
                    self._loop = None  # the blocked loop's thread is a daemon: left behind
                for name, cs in by_comp.items():
                    if self.components[name].spec.kind == "model":
                        continue  # bounded by their own timeout_s: a first call may load a model for minutes
                    stuck = next((c for c in cs if c.id in pending and now - watch.started.get(c.id, now) > c.timeout + _LOCAL_GRACE_S), None)
                    if stuck is None:
                        continue
                    watch.abandoned.add(name)
                    for c in cs:
                        if pending.pop(c.id, None) is None:
                            continue
                        msg = f"timeout: no result within {c.timeout:g}s; {_STUCK_THREAD}" if c is stuck else f"not run: an earlier call of {name!r} hung in this process"
                        out[c.id] = CallOutcome(failure(msg, len(c.samples)), c.timeout if c is stuck else 0.0, False)
                if pending:
                    watch.cond.wait(0.05)

    def _run_sync(self, calls: list[Call], watch: "_LocalCalls") -> None:
        for c in calls:
            comp = self.components[c.component]
            with watch.cond:
                if c.component in watch.abandoned:
                    return
                watch.started[c.id] = t = time.perf_counter()
            items, whole = run_call(comp.local, comp.defn, c.samples, c.timeout, None)
            watch.finish(c.id, CallOutcome(items, time.perf_counter() - t, whole))

    async def _run_async(self, calls: list[Call], watch: "_LocalCalls") -> None:
        async def one(c: Call) -> None:
            comp = self.components[c.component]
            t = time.perf_counter()
            items, whole = await run_call_async(comp.local, comp.defn, c.samples, c.timeout)
            watch.finish(c.id, CallOutcome(items, time.perf_counter() - t, whole))

        await asyncio.gather(*(one(c) for c in calls))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            t = threading.Thread(target=loop.run_forever, name="vlrl-reward-loop", daemon=True)
            t.start()
            self._loop, self._loop_thread = loop, t
        return self._loop

    # -- combining
    def _assemble(self, i: int, route: list[str], v: dict[str, tuple[Any, str | None, float]], work) -> "_Partial":
        p = _Partial(group_id=_gid(work[i], i))
        for name in _expand(route, self.gates):
            if name not in v:
                continue
            comp = self.components[name]
            value, err, elapsed = v[name]
            p.timings[name] = elapsed
            if err is not None:
                p.failures[name] = err
                p.components[name] = comp.fallback
                continue
            if isinstance(value, dict):
                for k, x in value.items():
                    p.components[f"{name}/{k}"] = x
                p.components[name] = sum(comp.cfg.sub_weights.get(k, 1.0) * x for k, x in value.items() if x is not None) if any(x is not None for x in value.values()) else None
            else:
                p.components[name] = value
        for gname, g in self.gates.items():
            if gname not in route:
                continue
            rv, rerr = p.components.get(g.rule), p.failures.get(g.rule)
            if rerr is None and rv is not None:
                p.components[gname], p.gate_src[gname] = rv, "rule"
            else:
                p.components[gname], p.gate_src[gname] = p.components.get(g.model), "model"
                if g.model in p.failures:
                    p.failures.setdefault(gname, p.failures[g.model])
        p.route = route
        return p

    def _standardize(self, work: list[RewardSample], parts: list["_Partial"]) -> None:
        eps = self.config.standardize_eps
        for comp in self.components.values():
            if not comp.standardize:
                continue
            groups: dict[Any, list[int]] = collections.defaultdict(list)
            for i, p in enumerate(parts):
                x = p.components.get(comp.name)
                if comp.name not in p.failures and isinstance(x, (int, float)):
                    groups[p.group_id].append(i)
            for idxs in groups.values():
                xs = [parts[i].components[comp.name] for i in idxs]
                mu, sd = sum(xs) / len(xs), _std(xs)
                for i, x in zip(idxs, xs):
                    parts[i].components[f"{comp.name}/raw"] = x
                    parts[i].components[comp.name] = (x - mu) / (sd + eps) if len(xs) > 1 else 0.0
        for p in parts:
            p.correct = self._correct(p)

    def _correct(self, p: "_Partial") -> bool | None:
        verdicts = []
        for name in p.route:
            if name in self.gates:
                g = self.gates[name]
                thr = self.components[g.rule].correct_at if p.gate_src.get(name) == "rule" else g.model_correct_at
                val = p.components.get(name)  # the raw rule or model value
                if name not in p.failures and val is not None and thr is not None:
                    verdicts.append(val >= thr)
            elif name in self.components:
                comp = self.components[name]
                val = p.components.get(f"{name}/raw", p.components.get(name))
                if comp.correct_at is not None and name not in p.failures and val is not None:
                    verdicts.append(val >= comp.correct_at)
        return any(verdicts) if verdicts else None

    def _finish(self, p: "_Partial") -> RewardResult:
        contributions = {}
        for name in p.route:
            if name in self.gates:
                w = self.gates[name].weight
            else:
                w = self.components[name].cfg.weight
            x = p.components.get(name)
            if x is not None:
                contributions[name] = w * x
        total = sum(contributions.values())
        return RewardResult(total=total, components=p.components, contributions=contributions, failures=p.failures, timings=p.timings, correct=p.correct)


_LOCAL_GRACE_S = 1.0  # slack past a call's timeout before an in-process call counts as stuck
_BLOCKED_LOOP = (
    "the event loop of in-process async plugins stayed blocked: an async plugin must not block "
    "(time.sleep, a blocking HTTP client, CPU-bound work); await instead, use asyncio.to_thread, or set isolate: true"
)
_STUCK_THREAD = "an in-process plugin cannot be stopped (its thread is left running); set isolate: true to run it in the pool, where a stuck call is killed"


class _LocalCalls:
    """The in-process calls of one _execute: when each sync call started, what each returned.

    Why: an in-process plugin cannot be stopped. A sync one that hangs holds its thread, and an
    async one that blocks holds the event loop, where asyncio's timeouts never fire; waiting on
    them without a bound froze the whole RL run with no message. So a call past its timeout
    is failed and its thread or loop (daemons) left behind, as the pool kills a stuck worker."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.cond = threading.Condition()
        self.started: dict[int, float] = {}
        self.done: dict[int, CallOutcome] = {}
        self.abandoned: set[str] = set()  # components whose thread is stuck: their other calls are not run

    def finish(self, cid: int, outcome: CallOutcome) -> None:
        with self.cond:
            self.done[cid] = outcome
            self.cond.notify_all()


@dataclass
class _Partial:
    group_id: Any
    components: dict[str, float | None] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    gate_src: dict[str, str] = field(default_factory=dict)
    route: list[str] = field(default_factory=list)
    correct: bool | None = None


def _expand(route: list[str], gates: dict[str, GateConfig]) -> list[str]:
    out = []
    for n in route:
        if n in gates:
            out += [gates[n].rule, gates[n].model]
        else:
            out.append(n)
    return list(dict.fromkeys(out))


def _gid(s: RewardSample, i: int) -> Any:
    return s.group_id if s.group_id is not None else ("__single__", i)


def _with_groups(samples: list[RewardSample]) -> list[RewardSample]:
    """Copies of the samples with `group` / `group_index` filled in (the inputs stay untouched)."""
    work = [dataclasses.replace(s, group=(), scores={}, correct=None) for s in samples]
    groups: dict[Any, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(work):
        groups[_gid(s, i)].append(i)
    for idxs in groups.values():
        members = tuple(work[i] for i in idxs)
        for k, i in enumerate(idxs):
            work[i].group = members
            work[i].group_index = k
    return work

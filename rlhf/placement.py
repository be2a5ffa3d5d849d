"""Where the RL stage's workers run, and the Ray plumbing for it.

Placements (the recipe's `placement`):
- `colocate` (default; one device used in turns, the only sensible mode on one GPU or
  on CPU): rollout workers are Ray actors; trainer, reference and reward stack live in
  the controller's process. The steps of a synchronous GRPO loop never overlap, so
  separate processes for the trainer and reference would only add copies: in-process,
  the reference reads the batch the trainer reads, and the trainer's weights are
  packed once per step into Ray's shared-memory store for the rollout workers. The
  rollout workers stay actors so a crashed engine is restarted by Ray and its step
  retried, without losing the trainer.
- `split`: every worker is its own Ray actor; rollout workers get their own devices
  (one GPU/NPU each on accelerators).
- `inline`: no Ray at all, every worker an object in the controller's process
  (debugging, notebooks, and the fastest start for tiny runs).

Ray starts locally with this machine's CPUs (`ray.address: null`) or joins a cluster
(`ray.address: auto` or `host:port`). An actor is reached through `Remote`, which turns
`proxy.method(args)` into `ray.get(actor.method.remote(args))`, so the controller's code
is the same for every placement.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from rollout.engine import Completion, GenerationRequest, SamplingParams, StaleWeightsError, engine_class
from rollout.worker import RolloutWorker
from vlrl.device import DeviceSpec
from vlrl.errors import VlrlError
from vlrl.recipe_rl import RaySpec


def start_ray(spec: RaySpec) -> bool:
    """Start (or join) Ray; -> True when this call started it (so the stage stops it)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if spec.address is None:
        kwargs.update(address="local", num_cpus=spec.num_cpus or os.cpu_count() or 1)
        if spec.object_store_mb is not None:
            kwargs["object_store_memory"] = spec.object_store_mb * 2**20
    else:
        kwargs["address"] = spec.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local Ray" if spec.address is None else f"the Ray cluster at {spec.address!r}"
        raise VlrlError(f"cannot start {where}: {_causes(e)}{_auth_hint(e)}") from e
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(" Last connection error:")[0]  # Ray's GCS error then dumps a traceback


def _chain(e: BaseException | None) -> list[BaseException]:
    """The error, then what caused it, and so on (each once)."""
    out: list[BaseException] = []
    while e is not None and all(e is not seen for seen in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _causes(e: BaseException) -> str:
    """The error and what caused it: Ray wraps the reason a join failed (a wrong token,
    no GCS at the address) in a generic "Failed to connect", which alone says nothing."""
    lines: list[str] = []
    for err in _chain(e):
        line = _first_line(err)
        if line not in lines:
            lines.append(line)
    return " <- ".join(lines)


def _auth_hint(e: BaseException) -> str:
    if any(t in f"{type(err).__name__} {err}" for err in _chain(e) for t in ("AuthenticationError", "InvalidAuthToken")):
        return (". The cluster uses token authentication: run with RAY_AUTH_MODE=token and its token in "
                "~/.ray/auth_token or RAY_AUTH_TOKEN (or ray.address: auto on the head node)")
    return ""


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class Remote:
    """A Ray actor whose methods are called synchronously: `proxy.m(x)` = `ray.get(actor.m.remote(x))`."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def submit(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Start `name` -> its ObjectRef (not waited for)."""
        return getattr(self.actor, name).remote(*args, **kwargs)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.actor, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            import ray

            return ray.get(method.remote(*args, **kwargs))

        return call


class RankGroup:
    """The N rank actors of one FSDP2 trainer, used as one worker: a call goes to every
    rank at once (each forward and gather is a collective that needs all of them) and
    rank 0's answer comes back; the others' answers are the same, or None."""

    def __init__(self, actors: Sequence[Any]) -> None:
        self.actors = list(actors)

    def submit(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Start `name` on every rank -> rank 0's ObjectRef (the other ranks run alongside;
        an actor runs its calls in order, so later calls wait for them)."""
        refs = [getattr(a, name).remote(*args, **kwargs) for a in self.actors]
        return refs[0]

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            import ray

            return ray.get([getattr(a, name).remote(*args, **kwargs) for a in self.actors])[0]

        return call

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def free_port() -> int:
    """A TCP port free on this host now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_bundles(device: DeviceSpec, ranks: int) -> Any:
    """On accelerators, a Ray placement group of one device per rank, so rank r of the
    trainer, of the reference and rollout worker r share device r (colocate) instead of
    Ray packing fractions of several ranks onto one device. None on CPU (nothing to place)."""
    if device.kind == "cpu" or ranks == 1:
        return None
    import ray
    from ray.util.placement_group import placement_group

    key = device.ray_resource or "GPU"
    pg = placement_group([{key: 1}] * ranks, strategy="PACK")
    ray.get(pg.ready())
    return pg


def spawn_ranks(cls: type, ranks: int, placement: str, device: DeviceSpec, role: str, /, *args: Any, bundles: Any = None, **kwargs: Any) -> RankGroup:
    """`ranks` actors of `cls`, rank r built with `rank=r, world_size=ranks` and a shared
    master port, joined into one process group by their constructors. Single node: the
    port is picked here, on the driver's host (a multi-node cluster is not supported yet)."""
    import ray

    port = free_port()
    actors = []
    for r in range(ranks):
        opts = _in_bundle(actor_options(device, placement, role), bundles, r)
        actors.append(ray.remote(cls).options(max_restarts=0, max_task_retries=0, **opts).remote(
            *args, rank=r, world_size=ranks, master_port=port, **kwargs
        ))
    return RankGroup(actors)


def actor_options(device: DeviceSpec, placement: str, role: str) -> dict[str, Any]:
    """Ray resources of one actor. On CPU none are reserved: every process sets its own
    torch threads (`threads`), and reserving CPUs would only make 4 actors unschedulable
    on a 2-core machine. On accelerators, colocated actors share the device in turns
    (a fraction each); in split, rollout workers, trainer and reference get a whole
    device each and the reward worker none (its model rewards run where it runs)."""
    if device.kind == "cpu" or role == "reward":
        return {"num_cpus": 0}
    amount = 0.25 if placement == "colocate" else 1
    if device.ray_resource in (None, "GPU"):
        return {"num_cpus": 0, "num_gpus": amount}
    return {"num_cpus": 0, "resources": {device.ray_resource: amount}}


def check_resources(device: DeviceSpec, placement: str, roles: dict[str, int]) -> None:
    """Fail now, with the numbers, rather than wait forever for actors Ray cannot place."""
    if placement == "inline":
        return
    import ray

    need: dict[str, float] = {}
    for role, count in roles.items():
        opts = actor_options(device, placement, role)
        for key, amount in [("GPU", opts.get("num_gpus", 0))] + list(opts.get("resources", {}).items()):
            if amount:
                need[key] = need.get(key, 0.0) + amount * count
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        what = ", ".join(f"{k}: needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise VlrlError(f"placement {placement!r} cannot be scheduled ({what}); use placement colocate or fewer rollout.workers")


def _in_bundle(opts: dict[str, Any], bundles: Any, index: int) -> dict[str, Any]:
    if bundles is None:
        return opts
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {**opts, "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=bundles, placement_group_bundle_index=index)}


def spawn(
    cls: type, placement: str, device: DeviceSpec, role: str, /, *args: Any, max_restarts: int = 0, bundle: tuple[Any, int] | None = None,
    **kwargs: Any,
) -> Any:
    """`cls(*args, **kwargs)` in this process (inline) or as a Ray actor behind `Remote`;
    `bundle` (placement group, index): the device it shares with that trainer rank."""
    if placement == "inline":
        return cls(*args, **kwargs)
    import ray

    opts = actor_options(device, placement, role)
    if bundle is not None:
        opts = _in_bundle(opts, *bundle)
    actor = ray.remote(cls).options(max_restarts=max_restarts, max_task_retries=0, **opts).remote(*args, **kwargs)
    return Remote(actor)


# --------------------------------------------------------------------------- rollout workers


def _dead(e: BaseException) -> bool:
    """A worker that died or is restarting (as opposed to a bug in the request)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(e, (RayActorError, ActorUnavailableError))


class RolloutPool:
    """The step's prompts split over the rollout workers; a dead worker's share is retried.

    `current_weights()` -> (packed full weights, version) is asked only when a worker comes
    back from a restart holding older weights than the step requires."""

    def __init__(self, workers: Sequence[Any], *, remote: bool, current_weights: Callable[[], tuple[Any, int]], retries: int = 2) -> None:
        self.workers = list(workers)
        self.remote = remote
        self.current_weights = current_weights
        self.retries = retries
        self.restarts = 0  # worker restarts seen (each one retried a step's share)

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams, min_version: int) -> tuple[list[list[Completion]], dict[str, float]]:
        """-> (completions per request, in request order; {"seconds", "tokens"} of the slowest worker / all)."""
        shares = _split(list(requests), len(self.workers))
        if not self.remote:
            outs = [w.generate(s, params, min_version) for w, s in zip(self.workers, shares) if s]
        else:
            refs = [(i, w.actor.generate.remote(s, params, min_version)) for i, (w, s) in enumerate(zip(self.workers, shares)) if s]
            outs = [self._get(i, ref, shares[i], params, min_version) for i, ref in refs]
        groups = [g for out, _ in outs for g in out]
        stats = {"seconds": max(s["seconds"] for _, s in outs), "tokens": sum(s["tokens"] for _, s in outs)}
        return groups, stats

    def _get(self, i: int, ref: Any, share: list, params: SamplingParams, min_version: int):
        import ray

        for attempt in range(self.retries + 1):
            try:
                return ray.get(ref)
            except Exception as e:  # noqa: BLE001 - sorted below
                stale = isinstance(e, StaleWeightsError)
                if not (_dead(e) or stale) or attempt == self.retries:
                    raise
                if not stale:
                    self.restarts += 1
                self._resync(self.workers[i])
                ref = self.workers[i].actor.generate.remote(share, params, min_version)
        raise AssertionError("unreachable")

    def _resync(self, worker: Remote, timeout_s: float = 300.0) -> None:
        """Wait for a restarted worker, then give it the current weights if it is behind."""
        import ray

        deadline = time.time() + timeout_s
        while True:
            try:
                held = ray.get(worker.actor.version.remote())
                break
            except Exception as e:  # noqa: BLE001
                if not _dead(e) or time.time() > deadline:
                    raise VlrlError(f"rollout worker did not come back after a crash ({type(e).__name__}: {e})") from e
                time.sleep(0.2)
        packed, version = self.current_weights()
        if held < version:
            ray.get(worker.actor.update_weights.remote(packed, version))

    def sync(self, packed_or_named: Any, version: int) -> None:
        """Send new weights to every worker (packed numpy for actors, tensors in-process)."""
        if not self.remote:
            for w in self.workers:
                w.update_tensors(packed_or_named, version)
            return
        import ray

        # Once in the shared-memory store, read by every worker (a split trainer already put it there).
        ref = packed_or_named if isinstance(packed_or_named, ray.ObjectRef) else ray.put(packed_or_named)
        refs = [w.actor.update_weights.remote(ref, version) for w in self.workers]
        for w, r in zip(self.workers, refs):
            for attempt in range(self.retries + 1):
                try:
                    ray.get(r)
                    break
                except Exception as e:  # noqa: BLE001
                    if not _dead(e) or attempt == self.retries:
                        raise
                    self.restarts += 1
                    self._resync(w)  # a restarted worker gets the full current weights instead
                    break

    def sleep(self, level: int = 1) -> None:
        """Every engine frees its device memory (level 1: weights to host, KV cache dropped)."""
        self._all("sleep", level)

    def wake(self) -> None:
        self._all("wake")

    def _all(self, name: str, *args: Any) -> None:
        if not self.remote:
            for w in self.workers:
                getattr(w, name)(*args)
            return
        import ray

        ray.get([getattr(w.actor, name).remote(*args) for w in self.workers])

    def versions(self) -> list[int]:
        return [w.version() for w in self.workers]

    def wait_ready(self) -> None:
        """Block until every worker has built its engine; a worker whose start failed is
        reported with its cause (Ray would otherwise keep restarting it)."""
        if not self.remote:
            return
        import ray

        for i, w in enumerate(self.workers):
            try:
                ray.get(w.actor.version.remote())
            except Exception as e:  # noqa: BLE001
                cause = str(e).strip().splitlines()
                last = next((ln for ln in reversed(cause) if ln.strip()), type(e).__name__)
                raise VlrlError(f"rollout worker {i} failed to start: {last.strip()}") from e

    def close(self) -> None:
        for w in self.workers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - closing must not hide the caller's error
                pass
        if self.remote:
            import ray

            for w in self.workers:
                ray.kill(w.actor)


def _split(items: list, parts: int) -> list[list]:
    """Contiguous shares, sizes differing by at most one (request order is kept)."""
    k, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def make_rollout_pool(
    cfg_rollout,
    placement: str,
    device: DeviceSpec,
    model_path: str,
    *,
    threads: int | None,
    current_weights: Callable[[], tuple[Any, int]],
    retries: int,
    suppress: tuple[int, ...] = (),
    bundles: Any = None,
    ranks: int = 1,
) -> RolloutPool:
    """Rollout workers built from the starting checkpoint at version 0. `suppress`: token
    ids the engines never sample (engine option `suppress_token_ids`). `bundles`: the
    trainer ranks' placement group (colocate on accelerators): worker i shares rank
    i mod `ranks`'s device."""
    engine_class(cfg_rollout.engine)  # an unknown or planned kind fails here, not in an actor
    opts: dict[str, Any] = dict(suppress_token_ids=list(suppress))
    if cfg_rollout.engine == "hf":
        opts["max_batch_rows"] = cfg_rollout.max_batch_rows
    opts.update(cfg_rollout.engine_options)
    workers = [
        spawn(RolloutWorker, placement, device, "rollout", cfg_rollout.engine, str(model_path), device=device.kind, version=0,
              threads=threads, options=opts, max_restarts=max(retries, 1) if placement != "inline" else 0,
              bundle=None if bundles is None else (bundles, i % ranks))
        for i in range(cfg_rollout.workers)
    ]
    return RolloutPool(workers, remote=placement != "inline", current_weights=current_weights, retries=retries)

"""A process pool for reward plugins that kills and replaces a worker stuck on one call.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop one hung task (sympy on
`9^9^9^9` never returns to the interpreter, so signals do not help either), and a
crashed worker breaks the whole executor. Here every worker is our own process:

- The parent sends a *chunk* of calls per round trip (so IPC cost is paid per chunk,
  not per sample); the worker runs them one by one and writes, in shared memory, which
  call it is on and since when (the heartbeat).
- A call past its timeout: the parent kills that worker (SIGKILL), records a timeout
  for that call only, starts a replacement, and requeues the chunk's unfinished calls.
- A worker that dies (segfault, `os._exit`, OOM kill): the call it was on fails with the
  exit status; the rest is requeued the same way.
- Everything else (exceptions, NaN, wrong types, huge values) is caught inside the
  worker by `rewards.execute`, which never lets a plugin error end the process.

Workers start with 'spawn' (or 'forkserver'): torch and Ray do not survive fork.
Results flow back in batches at most `flush_s` apart; a killed worker's unflushed
results are recomputed, never lost.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import signal
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from rewards.api import PluginError, RewardSample, bind_plugin, describe_exception
from rewards.execute import ComponentDef, ItemOutcome, failure, run_call

_IDLE = -1.0
_GRACE_S = 0.05  # slack before a call counts as hung
_MAX_REQUEUES = 3  # a call requeued this often (workers dying under it) fails


@dataclass
class Call:
    """One plugin invocation: one sample, or a batch for batched plugins."""

    id: int
    component: str
    samples: list[RewardSample]
    timeout: float


@dataclass
class CallOutcome:
    items: list[ItemOutcome]  # one (value, error) per sample of the call
    elapsed: float  # seconds the call ran (the timeout, for a killed call)
    whole: bool = False  # the call failed as a whole (not item by item)


@dataclass
class PoolStats:
    calls: int = 0
    timeouts: int = 0  # calls killed for running past their timeout
    crashes: int = 0  # calls whose worker died under them
    restarts: int = 0  # workers started to replace a killed or dead one
    requeued: int = 0  # calls re-sent after their worker went away


# --------------------------------------------------------------------------------------
# The worker process.

_IN_WORKER = False


def in_worker() -> bool:
    """True inside a pool worker, where the parent enforces timeouts by killing the process
    (plugins with their own signal-based timeouts can turn them off there)."""
    return _IN_WORKER


def _worker_main(conn, heartbeat, components: dict[str, ComponentDef], memory_mb: int | None, flush_s: float) -> None:
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    if memory_mb:
        try:
            import resource

            limit = int(memory_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    from rewards.registry import load_builtins, load_ref

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeouts are off" notice: we kill instead
    try:  # import the built-ins, and math-verify's parser when a built-in runs here
        load_builtins()
        if any(getattr(c.ref, "where", "") == "rewards.rules" for c in components.values()):
            from rewards.rules import warmup

            warmup()
    except Exception:
        pass
    loop = asyncio.new_event_loop()
    built: dict[str, Any] = {}

    def callable_for(name: str):
        if name not in built:
            comp = components[name]
            try:
                obj = load_ref(comp.ref)
                built[name] = bind_plugin(obj, is_class=comp.is_class, is_async=comp.is_async, args=comp.args)
            except BaseException as e:  # noqa: BLE001
                built[name] = PluginError(f"could not load plugin {name!r} in the worker process: {describe_exception(e)}")
        return built[name]

    conn.send(("ready", os.getpid()))
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            msg = pickle.loads(raw)
        except BaseException as e:  # noqa: BLE001 - e.g. a sample holding an object this process cannot import
            conn.send(("bad_chunk", f"the worker could not unpickle the samples: {describe_exception(e)}"))
            continue
        if msg[0] == "stop":
            return
        _, chunk_id, calls = msg
        pending: list[tuple[int, list[ItemOutcome], float, bool]] = []
        last_flush = time.monotonic()
        for call_id, name, samples, timeout in calls:
            heartbeat[1] = time.monotonic()
            heartbeat[0] = float(call_id)
            t0 = time.perf_counter()
            fn = callable_for(name)
            if isinstance(fn, Exception):
                items, whole = failure(str(fn), len(samples)), False
            else:
                items, whole = run_call(fn, components[name], samples, timeout, loop)
            heartbeat[0] = _IDLE
            pending.append((call_id, items, time.perf_counter() - t0, whole))
            if time.monotonic() - last_flush >= flush_s:
                _send(conn, pending)
                pending = []
                last_flush = time.monotonic()
        _send(conn, pending)
        conn.send(("done", chunk_id))


def _send(conn, results) -> None:
    if not results:
        return
    try:
        conn.send(("results", results))
    except Exception as e:  # a value that does not pickle: report per call instead
        safe = [(cid, failure(f"result could not be sent back: {describe_exception(e)}", len(items)), el, False) for cid, items, el, _ in results]
        conn.send(("results", safe))


# --------------------------------------------------------------------------------------
# The parent side.


@dataclass
class _Worker:
    proc: Any
    conn: Any
    heartbeat: Any
    started: float
    ready: bool = False
    chunk: list[Call] | None = None
    waiting: dict[int, Call] = field(default_factory=dict)  # calls sent, result not yet received

    @property
    def busy(self) -> bool:
        return self.chunk is not None


class WorkerPool:
    """`size` worker processes that run `Call`s for the given components.

    `run(calls)` blocks until every call has an outcome; it never raises for plugin
    failures. The pool outlives any number of killed or crashed workers."""

    def __init__(
        self,
        components: dict[str, ComponentDef],
        size: int = 2,
        *,
        start_method: str = "spawn",
        memory_mb: int | None = None,
        max_chunk: int = 128,
        flush_s: float = 0.2,
        boot_timeout_s: float = 120.0,
    ) -> None:
        if size < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        self.components = components
        self.size = size
        self.memory_mb = memory_mb
        self.max_chunk = max_chunk
        self.flush_s = flush_s
        self.boot_timeout_s = boot_timeout_s
        self.stats = PoolStats()
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._boot_failures = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    # -- lifecycle
    def start(self) -> "WorkerPool":
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every worker has booted (imports done): for benchmarks and tests."""
        self.start()
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self._workers) and time.monotonic() < deadline:
            for w in self._workers:
                while not w.ready and w.conn.poll(0.05):
                    self._handle(w, w.conn.recv(), {}, collections.deque())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(("stop",))
            except Exception:
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
        _kill_all(self._workers)
        self._workers.clear()

    def __enter__(self) -> "WorkerPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        hb = self._ctx.RawArray("d", 2)
        hb[0] = _IDLE
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, hb, self.components, self.memory_mb, self.flush_s),
            name="vlrl-reward-worker",
            daemon=True,
        )
        proc.start()
        child.close()
        return _Worker(proc=proc, conn=parent, heartbeat=hb, started=time.monotonic())

    # -- running
    def run(self, calls: list[Call]) -> dict[int, CallOutcome]:
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        self.start()
        out: dict[int, CallOutcome] = {}
        if not calls:
            return out
        self.stats.calls += len(calls)
        attempts: dict[int, int] = collections.Counter()
        queue: collections.deque[list[Call]] = collections.deque(self._chunks(calls))
        while len(out) < len(calls):
            for w in self._workers:
                while not w.busy and queue and w.proc.is_alive():
                    self._dispatch(w, queue.popleft(), out, queue)
            if self._boot_failures >= 3:  # workers cannot even start: fail what is left
                msg = (
                    "reward worker processes fail to start (see stderr); a script that scores rewards must "
                    "guard its top level with `if __name__ == \"__main__\":` (workers are spawned)"
                )
                for chunk in list(queue) + [list(w.waiting.values()) for w in self._workers]:
                    for c in chunk:
                        out.setdefault(c.id, CallOutcome(failure(msg, len(c.samples)), 0.0))
                break
            waitables = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
            mpc.wait(waitables, timeout=self._wait_timeout())
            for i, w in enumerate(list(self._workers)):
                dead = False
                try:
                    while w.conn.poll():
                        self._handle(w, w.conn.recv(), out, queue)
                except (EOFError, OSError):
                    dead = True
                if dead or not w.proc.is_alive():
                    if not w.ready:  # died while starting: importing the parent's script, a plugin module, ...
                        self._boot_failures += 1
                    self._replace(i, w, out, queue, attempts, reason=self._death_reason(w))
                    continue
                self._check_deadline(i, w, out, queue, attempts)
        return out

    def _chunks(self, calls: list[Call]) -> list[list[Call]]:
        # ~4 chunks per worker balances load; groups stay together because calls arrive ordered
        n = max(1, min(self.max_chunk, math.ceil(len(calls) / (self.size * 4))))
        return [calls[i : i + n] for i in range(0, len(calls), n)]

    def _dispatch(self, w: _Worker, chunk: list[Call], out: dict[int, CallOutcome], queue) -> None:
        payload = [(c.id, c.component, c.samples, c.timeout) for c in chunk]
        try:
            w.conn.send(("run", id(chunk), payload))
        except (BrokenPipeError, EOFError, OSError):
            w.chunk, w.waiting = chunk, {c.id: c for c in chunk}  # the death check requeues it
            return
        except Exception as e:  # a sample that does not pickle
            self._split_or_fail(chunk, f"cannot send the sample to a worker process: {describe_exception(e)}", out, queue)
            return
        w.chunk = chunk
        w.waiting = {c.id: c for c in chunk}

    @staticmethod
    def _split_or_fail(chunk: list[Call], error: str, out: dict[int, CallOutcome], queue) -> None:
        """A chunk that failed as a whole: retry its calls one per chunk, so only the culprit fails."""
        if len(chunk) > 1:
            queue.extendleft([c] for c in reversed(chunk))
            return
        for c in chunk:
            out[c.id] = CallOutcome(failure(error, len(c.samples)), 0.0, True)

    def _handle(self, w: _Worker, msg: tuple, out: dict[int, CallOutcome], queue) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready = True
            self._boot_failures = 0
        elif kind == "results":
            for call_id, items, elapsed, whole in msg[1]:
                if w.waiting.pop(call_id, None) is not None:
                    out[call_id] = CallOutcome(items, elapsed, whole)
        elif kind == "bad_chunk":
            chunk = [c for c in (w.chunk or []) if c.id in w.waiting]
            w.waiting.clear()
            w.chunk = None
            self._split_or_fail(chunk, msg[1], out, queue)
        elif kind == "done":
            w.chunk = None
            for c in list(w.waiting.values()):  # should not happen; never leave a call behind
                out.setdefault(c.id, CallOutcome(failure("worker finished its chunk without this result", len(c.samples)), 0.0))
            w.waiting.clear()

    def _wait_timeout(self) -> float:
        now, soonest = time.monotonic(), 0.5
        for w in self._workers:
            if not w.ready:
                soonest = min(soonest, max(0.0, w.started + self.boot_timeout_s - now))
            cur = _current(w)
            if cur is not None:
                call, since = cur
                soonest = min(soonest, max(0.0, since + call.timeout + _GRACE_S - now))
        return max(0.002, soonest)

    def _check_deadline(self, i, w, out, queue, attempts) -> None:
        now = time.monotonic()
        if not w.ready and w.busy and now - w.started > self.boot_timeout_s:
            self._boot_failures += 1
            self._kill(w)
            self._replace(i, w, out, queue, attempts, reason=f"worker did not start within {self.boot_timeout_s:g}s")
            return
        cur = _current(w)
        if cur is None:
            return
        call, since = cur
        if now - since > call.timeout + _GRACE_S:
            self._kill(w)
            self.stats.timeouts += 1
            out[call.id] = CallOutcome(failure(f"timeout: no result within {call.timeout:g}s (worker killed and replaced)", len(call.samples)), call.timeout, True)
            w.waiting.pop(call.id, None)
            self._replace(i, w, out, queue, attempts, reason=None)

    def _death_reason(self, w: _Worker) -> str:
        w.proc.join(0.5)
        code = w.proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"crash: the worker process died ({how}) while running this call"

    def _replace(self, i, w: _Worker, out, queue, attempts, reason: str | None) -> None:
        """Retire worker i: fail the call it died on (if known), requeue the rest, start a new one."""
        cur = _current(w)
        if reason is not None and cur is not None:
            call, _ = cur
            self.stats.crashes += 1
            out[call.id] = CallOutcome(failure(reason, len(call.samples)), 0.0, True)
            w.waiting.pop(call.id, None)
        rest = []
        for c in w.waiting.values():
            if c.id in out:
                continue
            attempts[c.id] += 1
            if attempts[c.id] > _MAX_REQUEUES:
                out[c.id] = CallOutcome(failure(reason or "lost: worker processes kept dying while this call waited", len(c.samples)), 0.0)
            else:
                rest.append(c)
        if rest:
            self.stats.requeued += len(rest)
            queue.appendleft(rest)
        self._kill(w)
        try:
            w.conn.close()
        except Exception:
            pass
        if not self._closed:
            self._workers[i] = self._spawn()
            self.stats.restarts += 1

    @staticmethod
    def _kill(w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(5)


def _current(w: _Worker) -> tuple[Call, float] | None:
    """The call the worker is on now and when it started, from the heartbeat."""
    if not w.busy:
        return None
    a = w.heartbeat[0]
    since = w.heartbeat[1]
    if a == _IDLE or a != w.heartbeat[0]:
        return None
    call = w.waiting.get(int(a))
    return (call, since) if call is not None else None


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(2)
        except Exception:
            pass


"""Calling a plugin once and turning whatever happens into values or failure messages.

Shared by the pool workers and the in-process path, so a plugin fails the same way
wherever it runs. A call covers one sample (sync / async forms) or a batch (batched form).
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from rewards.api import Bounds, RewardError, RewardSample, check_batch, check_value, describe_exception, short

# (value, error): error is None on success; value is None when not applicable or failed
ItemOutcome = tuple[Any, "str | None"]


@dataclass(frozen=True)
class ComponentDef:
    """What a process needs to build one component's callable (picklable)."""

    name: str
    ref: Any  # PluginRef, or the object itself for in-process use
    args: dict
    is_class: bool
    is_async: bool
    batched: bool
    bounds: Bounds | None = None  # a value outside fails the sample


def run_call(fn: Callable, comp: ComponentDef, samples: list[RewardSample], timeout: float, loop: asyncio.AbstractEventLoop | None) -> tuple[list[ItemOutcome], bool]:
    """Run one call synchronously in this thread; never raises for plugin errors.

    Returns the per-sample outcomes and whether the call failed as a whole (so a failed
    batch can be retried one sample at a time). Async plugins get `timeout` through
    asyncio; sync ones cannot be interrupted here (the pool's parent kills the worker)."""
    try:
        arg: Any = samples if comp.batched else samples[0]
        result = fn(arg)
        if inspect.isawaitable(result):
            if loop is None:
                raise RewardError("async plugin called without an event loop")
            result = loop.run_until_complete(_bounded(result, timeout))
        return _outcomes(result, comp, len(samples)), False
    except BaseException as e:  # noqa: BLE001 - plugins may raise SystemExit, KeyboardInterrupt, ...
        return _whole_failure(e, timeout, len(samples)), True


async def run_call_async(fn: Callable, comp: ComponentDef, samples: list[RewardSample], timeout: float) -> tuple[list[ItemOutcome], bool]:
    """The in-process path for async plugins: await with a timeout; never raises for plugin errors."""
    try:
        arg: Any = samples if comp.batched else samples[0]
        result = await _bounded(fn(arg), timeout)
        return _outcomes(result, comp, len(samples)), False
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # noqa: BLE001
        return _whole_failure(e, timeout, len(samples)), True


def _whole_failure(e: BaseException, timeout: float, n: int) -> list[ItemOutcome]:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) and not str(e):
        return failure(f"timeout: no result within {timeout:g}s", n)
    return failure(describe_exception(e), n)


async def _bounded(aw, timeout: float):
    return await asyncio.wait_for(aw, timeout)


def _outcomes(result: Any, comp: ComponentDef, n: int) -> list[ItemOutcome]:
    if comp.batched:
        out: list[ItemOutcome] = []
        for v in check_batch(result, n, comp.bounds):
            out.append((None, describe_exception(v)) if isinstance(v, BaseException) else (v, None))
        return out
    return [(check_value(result, comp.bounds), None)]


def failure(msg: str, n: int) -> list[ItemOutcome]:
    return [(None, short(msg))] * n

"""Hostile reward plugins and inputs, used by tests/rewards/test_rewards_hostile.py and
bench/bench_rewards.py. Loaded by file path (`.../rewards_hostile_corpus.py:NAME`), which is
itself part of what is tested: worker processes must load plugins from a path too.

Each case is (case name, component, sample fields, expectation); the expectation is a
substring of the failure message, or ("value", x) for a case that must score x.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rewards.api import RewardError, RewardSample, reward

HERE = Path(__file__).resolve()


def ref(name: str) -> str:
    return f"{HERE}:{name}"


# --------------------------------------------------------------------------------------
# Hostile plugins (not registered: register=False keeps the global registry clean)


@reward(register=False)
def hang(sample: RewardSample) -> float:
    while True:
        pass


@reward(register=False)
def sleep_forever(sample: RewardSample) -> float:
    time.sleep(3600)
    return 1.0


@reward(register=False)
def raises(sample: RewardSample) -> float:
    raise ValueError("bad input " + sample.response[:20])


@reward(register=False)
def raises_reward_error(sample: RewardSample) -> float:
    raise RewardError("the judge refused")


@reward(register=False)
def huge_message(sample: RewardSample) -> float:
    raise RuntimeError("x" * 5_000_000)


@reward(register=False)
def keyboard_interrupt(sample: RewardSample) -> float:
    raise KeyboardInterrupt


@reward(register=False)
def sys_exit(sample: RewardSample) -> float:
    sys.exit(3)


@reward(register=False)
def os_exit(sample: RewardSample) -> float:
    os._exit(7)


@reward(register=False)
def segfault(sample: RewardSample) -> float:
    ctypes.string_at(0)
    return 1.0


@reward(register=False)
def sigkill_self(sample: RewardSample) -> float:
    os.kill(os.getpid(), signal.SIGKILL)
    return 1.0


@reward(register=False)
def recursion(sample: RewardSample) -> float:
    return recursion(sample)


@reward(register=False)
def memory_bomb(sample: RewardSample) -> float:
    blob = bytearray(64 * 1024**3)  # 64 GiB: over the worker's address-space cap
    return float(len(blob))


@reward(register=False)
def nan(sample: RewardSample):
    return float("nan")


@reward(register=False)
def inf(sample: RewardSample):
    return float("-inf")


@reward(register=False)
def returns_str(sample: RewardSample):
    return "1.0"


@reward(register=False)
def returns_list(sample: RewardSample):
    return [1.0]


@reward(register=False)
def returns_huge_str(sample: RewardSample):
    return "y" * 10_000_000


@reward(register=False)
def returns_huge_int(sample: RewardSample):
    return 10**400


@reward(register=False)
def returns_bad_dict(sample: RewardSample):
    return {"a": 1.0, "b": "high"}


@reward(register=False)
def returns_many_keys(sample: RewardSample):
    return {f"k{i}": 1.0 for i in range(10_000)}


@reward(register=False)
def returns_nan_in_dict(sample: RewardSample):
    return {"a": 1.0, "b": float("nan")}


class _EvilRepr:
    def __repr__(self):
        raise RuntimeError("no repr for you")


@reward(register=False)
def returns_evil_object(sample: RewardSample):
    return _EvilRepr()


@reward(register=False)
async def slow_async(sample: RewardSample) -> float:
    await asyncio.sleep(3600)
    return 1.0


@reward(register=False)
async def async_raises(sample: RewardSample) -> float:
    await asyncio.sleep(0)
    raise ConnectionError("server went away")


@reward(register=False)
async def async_nan(sample: RewardSample):
    return float("nan")


@reward(register=False, isolate=True)
async def async_cpu_hang(sample: RewardSample) -> float:
    while True:  # blocks its event loop: only the pool can stop it
        pass


@reward(register=False, batched=True)
def batch_wrong_length(samples: list[RewardSample]) -> list[float]:
    return [1.0] * (len(samples) + 1)


@reward(register=False, batched=True)
def batch_one_bad(samples: list[RewardSample]) -> list:
    return [RewardError("no score in judge output") if "bad" in s.response else 1.0 for s in samples]


@reward(register=False, batched=True)
def batch_hangs_on_poison(samples: list[RewardSample]) -> list[float]:
    if any("poison" in s.response for s in samples):
        while True:
            pass
    return [0.5] * len(samples)


@reward(register=False)
def ok(sample: RewardSample) -> float:
    return 1.0


class FailsToUnpickle:
    """Pickles fine here; unpickling runs int("not a number") and raises."""

    def __reduce__(self):
        return (int, ("not a number",))


# --------------------------------------------------------------------------------------
# The corpus: (case, component, sample fields, expectation)

BIG = "lorem ipsum " * 500_000  # ~6 MB

CASES: list[tuple[str, str, dict, object]] = [
    ("cpu hang", "hang", {}, "timeout"),
    ("sleep forever", "sleep_forever", {}, "timeout"),
    ("exception", "raises", {}, "ValueError: bad input"),
    ("RewardError", "raises_reward_error", {}, "the judge refused"),
    ("5 MB exception message", "huge_message", {}, "RuntimeError: xxx"),
    ("KeyboardInterrupt", "keyboard_interrupt", {}, "KeyboardInterrupt"),
    ("sys.exit", "sys_exit", {}, "SystemExit: 3"),
    ("os._exit", "os_exit", {}, "exited with code 7"),
    ("segfault", "segfault", {}, "SIGSEGV"),
    ("SIGKILL itself", "sigkill_self", {}, "SIGKILL"),
    ("infinite recursion", "recursion", {}, "RecursionError"),
    ("64 GiB allocation", "memory_bomb", {}, "MemoryError"),
    ("NaN", "nan", {}, "returned nan"),
    ("-inf", "inf", {}, "returned -inf"),
    ("str instead of float", "returns_str", {}, "returned str"),
    ("list instead of float", "returns_list", {}, "returned list"),
    ("10 MB string", "returns_huge_str", {}, "returned str"),
    ("10**400", "returns_huge_int", {}, "not a float"),
    ("dict with a str value", "returns_bad_dict", {}, "named components must be float"),
    ("dict with 10,000 keys", "returns_many_keys", {}, "10000 keys"),
    ("dict with NaN", "returns_nan_in_dict", {}, "returned['b'] nan"),
    ("object whose repr raises", "returns_evil_object", {}, "repr failed"),
    ("slow async", "slow_async", {}, "timeout"),
    ("async exception", "async_raises", {}, "ConnectionError: server went away"),
    ("async NaN", "async_nan", {}, "returned nan"),
    ("async loop blocked", "async_cpu_hang", {}, "timeout"),
    ("batch of wrong length", "batch_wrong_length", {}, "returned 2 values for 1 samples"),
    ("batch item failed", "batch_one_bad", {"response": "bad"}, "no score in judge output"),
    ("batch item ok beside a failed one", "batch_one_bad", {"response": "fine"}, ("value", 1.0)),
    ("batch hangs on one sample", "batch_hangs_on_poison", {"response": "poison"}, "timeout"),
    ("batch neighbour of a hang", "batch_hangs_on_poison", {"response": "clean"}, ("value", 0.5)),
    # hostile inputs to the built-in math reward
    ("power tower 9^9^9^9", "math_accuracy", {"response": r"\boxed{9^{9^{9^{9}}}}", "answer": "1"}, "timeout"),
    ("malformed LaTeX", "math_accuracy", {"response": r"\boxed{\frac{1}{", "answer": "1"}, ("value", 0.0)),
    ("unbalanced \\left", "math_accuracy", {"response": r"\boxed{\left( 3 \right}", "answer": "3"}, ("value", 1.0)),
    ("lone backslashes", "math_accuracy", {"response": "\\boxed{\\\\\\}", "answer": "2"}, ("value", 0.0)),
    ("unicode answer", "math_accuracy", {"response": "答案是 \\boxed{½}", "answer": "0.5"}, ("value", 0.0)),
    ("zero-width + NUL", "exact_match", {"response": "\\boxed{re\u200bd\x00}", "answer": "red"}, ("value", 0.0)),
    ("emoji + RTL", "exact_match", {"response": "\\boxed{\u202e🙂}", "answer": "🙂"}, ("value", 0.0)),
    ("6 MB response, boxed at the end", "math_accuracy", {"response": BIG + r"\boxed{42}", "answer": "42"}, ("value", 1.0)),
    ("6 MB response for OCR", "ocr_similarity", {"response": BIG, "answer": "hello"}, ("value", 0.0)),
    ("100k nested braces", "math_accuracy", {"response": "\\boxed{" + "{" * 100_000, "answer": "1"}, ("value", 0.0)),
    ("no reference answer", "math_accuracy", {"response": r"\boxed{1}", "answer": None}, ("value", None)),
    ("sample that fails to unpickle", "ok", {"meta": {"x": FailsToUnpickle()}}, "could not unpickle"),
    ("sample that cannot be pickled", "ok", {"meta": {"lock": threading.Lock()}}, "cannot send the sample"),
    ("control: a good plugin", "ok", {}, ("value", 1.0)),
]

BUILTIN = {"math_accuracy", "exact_match", "ocr_similarity"}


def stack_config(timeout: float = 1.0, workers: int = 2) -> dict:
    """A stack with one component per plugin above; each case routes to its own."""
    comps = {}
    for _, comp, _, _ in CASES:
        if comp in comps:
            continue
        comps[comp] = {"fn": comp if comp in BUILTIN else ref(comp), "batch_size": 4}
    comps["math_accuracy"]["timeout"] = max(timeout, 2.0)
    return {"components": comps, "timeout": timeout, "workers": workers, "worker_memory_mb": 2048}


def samples() -> list[RewardSample]:
    out = []
    for i, (case, comp, fields, _) in enumerate(CASES):
        f = {"response": "hello", "answer": "1", **fields}
        out.append(RewardSample(id=f"case{i}", rewards=[comp], **f))
    return out

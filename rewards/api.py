"""The reward plugin contract: what a reward receives, what it may return, how it is declared.

A reward plugin is a function (or a class whose instances are callable) that takes
one `RewardSample` and returns:

1. a float (ints and bools are accepted and converted),
2. `None`, meaning "not applicable / cannot decide" (no value, not a failure),
3. or a dict of named components `{"name": float | None}`, logged as `<component>/<name>`.

Forms (decided from the function itself, or from the decorator for `batched`):

- sync:    `def f(sample, **options) -> float | dict | None`
- async:   `async def f(sample, **options) -> ...`
- batched: `@reward(batched=True) def f(samples, **options) -> list[...]`, one value per
           sample, in order; an `Exception` instance in the list fails that one item.

`bounds=(lo, hi)` declares the values the plugin can return (either end may be None): a
value outside fails that sample, as a NaN does, naming the bound, so a plugin that returns
a percentage where 0-1 was meant, or a raw logit, is caught where it ran instead of
swamping the group's advantages. A recipe component's `bounds:` sets or overrides it.

Options come from the recipe's `args:` and are checked against the signature when
the plugin is loaded, as is the return annotation (when there is one). A class plugin
takes its options in `__init__` (keep it cheap: load heavy things on first call) and
is called like a function.

`needs_scores=True` plugins run after every other component of the sample's group has
been scored: they see `sample.scores`, `sample.correct` and the same on each member of
`sample.group`. The length and diversity terms are such plugins.
"""

from __future__ import annotations

import inspect
import io
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Kind = Literal["rule", "model", "term"]
Value = Union[float, dict[str, Union[float, None]], None]
Bounds = tuple[Union[float, None], Union[float, None]]  # (lo, hi); None: that side unbounded

MAX_NAMED_COMPONENTS = 32  # a dict return with more keys than this is an error
MAX_ERROR_CHARS = 400  # failure messages are cut to this length


class RewardError(Exception):
    """Raised (or placed in a batched result) by a plugin to fail one sample with a message."""


class PluginError(Exception):
    """A plugin that cannot be used as declared (signature, return type, options).

    Raised at load time; the message starts with the plugin's name and source."""


# --------------------------------------------------------------------------------------
# Images: lazy, so samples cross process boundaries as paths/bytes, not pixels.


class LazyImages(Sequence):
    """A list of PIL images built on first access from paths, bytes or PIL images.

    Pickles as its sources (paths/bytes stay small); decoded images are cached per process."""

    def __init__(self, sources: Sequence[Any] = ()):
        self._sources = list(sources)
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i not in self._cache:
            self._cache[i] = _open_image(self._sources[i])
        return self._cache[i]

    @property
    def sources(self) -> list[Any]:
        return list(self._sources)

    def __reduce__(self):
        return (LazyImages, (self._sources,))

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} image(s))"


def _open_image(src: Any):
    from PIL import Image

    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray)):
        img = Image.open(io.BytesIO(src))
    else:
        img = Image.open(str(src))
    img.load()
    return img


# --------------------------------------------------------------------------------------
# The sample a plugin receives.


@dataclass(eq=False)
class RewardSample:
    """One response to score, with everything known about its prompt.

    The trainer builds these (one per response); the stack fills the fields marked
    "set by the stack" before calling plugins. Fields a plugin should treat as read-only.
    """

    response: str  # the generated text
    prompt: list[dict] = field(default_factory=list)  # chat messages [{"role", "content"}] before the response
    answer: str | None = None  # reference final answer (what belongs in \boxed{}), None when there is none
    reference: str | None = None  # the record's whole reference response (worked steps and all), None when it has none
    task: str = "chat"  # routes the default components (see rewards.stack.DEFAULT_ROUTING)
    difficulty: int = 1
    meta: dict[str, Any] = field(default_factory=dict)  # free per-record data (answer_type, choices, ...)
    response_ids: Sequence[int] | None = None  # (T,) generated token ids
    response_length: int | None = None  # T in tokens; defaults to len(response_ids), else whitespace words
    finish_reason: str = "stop"  # "stop" | "length" (hit max tokens) | "error"
    images: Sequence[Any] = field(default_factory=list)  # PIL images (paths / bytes are opened lazily)
    group_id: str | None = None  # responses to the same prompt share it; None = a group of one
    rewards: list[str] | None = None  # the record's own component list; None = route by task
    id: str | None = None  # record id, for messages
    # set by the stack:
    group: tuple["RewardSample", ...] = field(default=(), repr=False)  # all G responses of this prompt, self included
    group_index: int = 0  # position of this sample in `group`
    scores: dict[str, float | None] = field(default_factory=dict, repr=False)  # values so far (needs_scores plugins)
    correct: bool | None = None  # verdict of the accuracy components (needs_scores plugins); None = unknown

    def __post_init__(self) -> None:
        if not isinstance(self.images, LazyImages):
            self.images = LazyImages(self.images or ())
        if self.response_length is None:
            self.response_length = len(self.response_ids) if self.response_ids is not None else len(self.response.split())

    @property
    def question(self) -> str:
        """Text of the last user message (image placeholders dropped)."""
        for msg in reversed(self.prompt):
            if msg.get("role") == "user":
                return _content_text(msg.get("content"))
        return ""

    @property
    def group_size(self) -> int:
        return max(1, len(self.group))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


# --------------------------------------------------------------------------------------
# Declaring plugins.


@dataclass(frozen=True)
class RewardSpec:
    """What the registry knows about one plugin."""

    name: str
    obj: Any  # the function or class
    source: str  # where it came from, for messages: "builtin", "module:fn", "file.py:fn", "entry point x"
    batched: bool = False
    is_async: bool = False
    is_class: bool = False
    needs_scores: bool = False
    kind: Kind = "rule"
    isolate: bool = True  # default placement: the process pool (True) or in-process (False)
    correct_at: float | None = None  # a value at or above this marks the sample correct
    description: str = ""
    bounds: Bounds | None = None  # values it may return (None: unbounded)
    options: tuple[str, ...] = ()  # keyword options the plugin accepts
    required: tuple[str, ...] = ()  # options without defaults
    var_keyword: bool = False  # accepts **kwargs
    validate: Callable[..., None] | None = None  # checks option values at load time (raises ValueError)
    option_types: Mapping[str, Any] = field(default_factory=dict)  # annotated options: their types

    @property
    def label(self) -> str:
        return f"reward plugin {self.name!r} ({self.source})"

    def check_args(self, args: Mapping[str, Any]) -> None:
        unknown = [k for k in args if k not in self.options] if not self.var_keyword else []
        if unknown:
            raise PluginError(
                f"{self.label}: unknown option(s) {sorted(unknown)}; it accepts {list(self.options) or 'no options'}"
            )
        missing = [k for k in self.required if k not in args]
        if missing:
            raise PluginError(f"{self.label}: option(s) {missing} are required; set them under args:")
        for k, v in args.items():
            if k in self.option_types and not _fits(self.option_types[k], v):
                raise PluginError(f"{self.label}: option {k!r} = {v!r}: expected {_type_name(self.option_types[k])}")
        if self.validate is not None:
            try:
                self.validate(**args)
            except (TypeError, ValueError) as e:
                raise PluginError(f"{self.label}: bad options {dict(args)!r}: {e}") from e

    def make_callable(self, args: Mapping[str, Any]) -> Callable:
        """The object to call per sample (or per batch): a bound function or a class instance."""
        try:
            return bind_plugin(self.obj, is_class=self.is_class, is_async=self.is_async, args=dict(args))
        except PluginError:
            raise
        except (TypeError, ValueError) as e:
            raise PluginError(f"{self.label}: bad options {dict(args)!r}: {e}") from e


def bind_plugin(obj: Any, *, is_class: bool, is_async: bool, args: dict) -> Callable:
    """A one-argument callable: the class instantiated with `args`, or the function with them bound."""
    if is_class:
        return obj(**args)
    if not args:
        return obj
    if is_async:

        async def bound_async(x):
            return await obj(x, **args)

        return bound_async

    def bound(x):
        return obj(x, **args)

    return bound


SPEC_ATTR = "__vlrl_reward__"


def reward(
    name: str | Callable | None = None,
    *,
    batched: bool | None = None,
    needs_scores: bool = False,
    kind: Kind = "rule",
    isolate: bool | None = None,
    correct_at: float | None = None,
    description: str | None = None,
    validate: Callable[..., None] | None = None,
    bounds: Bounds | None = None,
    register: bool = True,
):
    """Declare a reward plugin and register it under `name` (default: the function's name).

        @reward("my_accuracy", correct_at=1.0)
        def my_accuracy(sample: RewardSample) -> float: ...

    `batched` defaults to what the first parameter's annotation says (`list[RewardSample]`).
    `isolate` picks where it runs by default: the process pool with per-call timeouts
    (the default for sync plugins) or in-process (the default for async and model
    plugins). The signature and return annotation are checked here, so mistakes
    surface when the module is imported, naming the plugin; `validate(**options)`, if
    given, checks option values when a stack loads the plugin. `bounds=(lo, hi)`: a value
    outside fails the sample (see the module docstring).
    """

    def deco(obj):
        from rewards.registry import REGISTRY, source_of

        spec = build_spec(
            obj,
            name=name if isinstance(name, str) else None,
            source=source_of(obj),
            batched=batched,
            needs_scores=needs_scores,
            kind=kind,
            isolate=isolate,
            correct_at=correct_at,
            description=description,
            validate=validate,
            bounds=bounds,
        )
        setattr(obj, SPEC_ATTR, spec)
        if register:
            REGISTRY.add(spec)
        return obj

    if callable(name) and not isinstance(name, str):  # bare @reward
        obj, name = name, None
        return deco(obj)
    return deco


def build_spec(
    obj: Any,
    *,
    name: str | None = None,
    source: str,
    batched: bool | None = None,
    needs_scores: bool = False,
    kind: Kind = "rule",
    isolate: bool | None = None,
    correct_at: float | None = None,
    description: str | None = None,
    validate: Callable[..., None] | None = None,
    bounds: Bounds | None = None,
) -> RewardSpec:
    """Inspect a function or class and check it against the contract."""
    is_class = inspect.isclass(obj)
    label_name = name or getattr(obj, "__name__", repr(obj))
    label = f"reward plugin {label_name!r} ({source})"
    if bounds is not None:
        try:
            bounds = check_bounds(bounds)
        except ValueError as e:
            raise PluginError(f"{label}: bounds {bounds!r}: {e}") from None
    if not callable(obj):
        raise PluginError(f"{label}: {type(obj).__name__} is not callable; a reward is a function or a class")
    call = obj.__call__ if is_class else obj
    if is_class and "__call__" not in {k for c in obj.__mro__[:-1] for k in vars(c)}:
        raise PluginError(f"{label}: class has no __call__(self, sample) method")
    is_async = inspect.iscoroutinefunction(call)
    if inspect.isasyncgenfunction(call) or inspect.isgeneratorfunction(call):
        raise PluginError(f"{label}: a reward must return a value, not be a generator")

    try:
        call_sig = inspect.signature(call)
    except (TypeError, ValueError) as e:
        raise PluginError(f"{label}: cannot read its signature: {e}") from e
    call_params = list(call_sig.parameters.values())
    if is_class:
        call_params = call_params[1:]  # self
    positional = [p for p in call_params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and not any(p.kind == p.VAR_POSITIONAL for p in call_params):
        raise PluginError(f"{label}: must take the sample as its first argument, e.g. def {label_name}(sample): ...")
    extra_pos = [p.name for p in positional[1:] if p.default is p.empty]
    if extra_pos:
        raise PluginError(
            f"{label}: only the sample may be positional; give {extra_pos} defaults or make them keyword-only (after *)"
        )

    # options: keyword parameters of the function, or of the class's __init__
    if is_class:
        opt_params = [p for p in list(inspect.signature(obj.__init__).parameters.values())[1:] if p.kind != p.VAR_POSITIONAL]
    else:
        opt_params = call_params[1:]
    options = tuple(p.name for p in opt_params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    required = tuple(
        p.name for p in opt_params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    )
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in opt_params)
    opt_hints = _hints(obj.__init__ if is_class else call)
    option_types = {n: opt_hints[n] for n in options if n in opt_hints}

    # batched: declared, or read from the first parameter's annotation (list[RewardSample])
    hints = _hints(call)
    if batched is None:
        first = positional[0].name if positional else None
        batched = bool(first and _is_sequence_annotation(hints.get(first)))
    if "return" in hints:
        _check_return_annotation(hints["return"], batched=batched, label=label)

    if isolate is None:
        isolate = not is_async and kind != "model"
    doc = description if description is not None else (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
    return RewardSpec(
        name=label_name,
        obj=obj,
        source=source,
        batched=bool(batched),
        is_async=is_async,
        is_class=is_class,
        needs_scores=needs_scores,
        kind=kind,
        isolate=isolate,
        correct_at=correct_at,
        description=doc,
        options=options,
        required=required,
        var_keyword=var_keyword,
        validate=validate,
        option_types=option_types,
        bounds=bounds,
    )


def _fits(tp: Any, value: Any) -> bool:
    """Whether a recipe value (YAML: str, int, float, bool, list, dict, None) fits an option's
    annotation: `unit: str` given 5, or `n: int` given "4", would otherwise reach the plugin
    as is and fail (or score wrongly) on every sample, hours into a run. Strict for the
    types YAML writes (a list may fill a tuple); lax where the annotation names other types
    (a str for a Path); an annotation pydantic cannot read is not checked."""
    from pydantic import TypeAdapter, ValidationError

    try:
        adapter = TypeAdapter(tp)
    except Exception:
        return True
    tries = [(value, True), (_tuples(value), True)] + ([] if _plain(tp) else [(value, False)])
    for v, strict in tries:
        try:
            adapter.validate_python(v, strict=strict)
            return True
        except ValidationError:
            continue
        except Exception:
            return True
    return False


_PLAIN = (int, float, str, bool, type(None), list, tuple, dict, set, frozenset, typing.Any)


def _plain(tp: Any) -> bool:
    """An annotation built only of the types YAML writes (and Literal, unions, containers)."""
    if typing.get_origin(tp) is Literal:
        return True
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is not None:
        return (origin in _PLAIN or origin in (Union, types.UnionType) or origin in (Sequence, Mapping)) and all(
            a is Ellipsis or _plain(a) for a in args
        )
    return tp in _PLAIN


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: skip the annotation check
        return {}


def _is_sequence_annotation(ann: Any) -> bool:
    origin = typing.get_origin(ann)
    return origin in (list, tuple, Sequence, typing.List, typing.Sequence) or ann in (list, tuple)


_SCALARS = (float, int, bool, type(None))


def _check_return_annotation(ann: Any, *, batched: bool, label: str) -> None:
    if ann is inspect.Signature.empty or ann is Any:
        return
    if typing.get_origin(ann) in (typing.Awaitable, typing.Coroutine) or _origin_name(ann) in ("Awaitable", "Coroutine"):
        args = typing.get_args(ann)
        ann = args[-1] if args else Any
        if ann is Any:
            return
    want = "a list of float | dict[str, float] | None" if batched else "float | dict[str, float] | None"
    if batched:
        if not _is_sequence_annotation(ann):
            raise PluginError(f"{label}: batched plugins return {want}, but the annotation says {_fmt(ann)}")
        args = typing.get_args(ann)
        if args and not all(_value_annotation_ok(a) for a in args if a is not Ellipsis):
            raise PluginError(f"{label}: batched plugins return {want}, but the annotation says {_fmt(ann)}")
        return
    if not _value_annotation_ok(ann):
        raise PluginError(f"{label}: a reward returns {want}, but the annotation says {_fmt(ann)}")


def _origin_name(ann: Any) -> str:
    o = typing.get_origin(ann)
    return getattr(o, "__name__", "") if o else ""


def _value_annotation_ok(ann: Any) -> bool:
    if ann is Any or ann is None or ann in _SCALARS or ann is numbers.Real:
        return True
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        return all(_value_annotation_ok(a) for a in typing.get_args(ann))
    if ann in (dict, Mapping) or origin in (dict, Mapping, typing.Dict, typing.Mapping):
        args = typing.get_args(ann)
        return not args or (args[0] in (str, Any) and _value_annotation_ok(args[1]))
    if isinstance(ann, type):
        try:  # numpy floating types and similar numbers.Real subclasses
            return issubclass(ann, numbers.Real)
        except TypeError:
            return False
    return False


def _fmt(ann: Any) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


# --------------------------------------------------------------------------------------
# Checking what a plugin returned (done where it ran, so bad values never travel).


def check_bounds(bounds: Any) -> Bounds:
    """(lo, hi) as floats (None: that side unbounded); ValueError says what is wrong."""
    if isinstance(bounds, (str, bytes, Mapping)) or not isinstance(bounds, Sequence) or len(bounds) != 2:
        raise ValueError("expected two numbers [lo, hi] (either may be null)")
    out = []
    for b in bounds:
        if b is not None and (isinstance(b, bool) or not isinstance(b, numbers.Real) or math.isnan(float(b))):
            raise ValueError(f"{b!r} is not a number")
        out.append(None if b is None else float(b))
    lo, hi = out
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"lo {lo:g} is above hi {hi:g}")
    return lo, hi


def fmt_bounds(bounds: Bounds) -> str:
    lo, hi = bounds
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"


def _in_bounds(f: float, where: str, bounds: Bounds | None) -> float:
    if bounds is not None and ((bounds[0] is not None and f < bounds[0]) or (bounds[1] is not None and f > bounds[1])):
        raise RewardError(f"returned{where} {f:g}, outside its bounds {fmt_bounds(bounds)}")
    return f


def check_value(v: Any, bounds: Bounds | None = None) -> float | dict[str, float | None] | None:
    """A plugin's return value as a reward value, or RewardError saying what is wrong
    (not a number, NaN or inf, outside `bounds`)."""
    if v is None:
        return None
    if isinstance(v, numbers.Real) and not isinstance(v, (str, bytes)):
        return _in_bounds(_finite(v, ""), "", bounds)
    if isinstance(v, Mapping):
        if len(v) > MAX_NAMED_COMPONENTS:
            raise RewardError(f"returned a dict with {len(v)} keys (at most {MAX_NAMED_COMPONENTS} named components)")
        out: dict[str, float | None] = {}
        for k, x in v.items():
            if not isinstance(k, str) or not k or len(k) > 64:
                raise RewardError(f"returned a dict with key {short(repr(k), 80)}; keys must be non-empty strings of at most 64 characters")
            if x is None:
                out[k] = None
            elif isinstance(x, numbers.Real):
                out[k] = _in_bounds(_finite(x, f"[{k!r}]"), f"[{k!r}]", bounds)
            else:
                raise RewardError(f"returned {{{k!r}: {type(x).__name__}}}; named components must be float or None")
        return out
    raise RewardError(f"returned {type(v).__name__} {short(repr_safe(v), 80)}; expected float, None or dict[str, float]")


def check_batch(values: Any, n: int, bounds: Bounds | None = None) -> list[Any]:
    """A batched plugin's return: a list of n values (or exceptions, which fail that item)."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise RewardError(f"batched plugin returned {type(values).__name__}; expected a list of {n} values")
    if len(values) != n:
        raise RewardError(f"batched plugin returned {len(values)} values for {n} samples")
    out = []
    for v in values:
        if isinstance(v, BaseException):
            out.append(v)
            continue
        try:
            out.append(check_value(v, bounds))
        except RewardError as e:
            out.append(e)
    return out


def _finite(x: numbers.Real, where: str) -> float:
    try:
        f = float(x)
    except (OverflowError, ValueError, TypeError) as e:
        raise RewardError(f"returned{where} a value that is not a float: {e}") from None
    if not math.isfinite(f):
        raise RewardError(f"returned{where} {f}")
    return f


def repr_safe(v: Any) -> str:
    if isinstance(v, (str, bytes)) and len(v) > 200:
        return repr(v[:200]) + f"... ({len(v)} long)"
    try:
        return repr(v)
    except Exception as e:  # a hostile __repr__
        return f"<{type(v).__name__}: repr failed: {type(e).__name__}>"


def short(s: str, n: int = MAX_ERROR_CHARS) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 3] + "..."


def describe_exception(e: BaseException) -> str:
    try:
        msg = str(e)
    except Exception:
        msg = "<str() of the exception failed>"
    if isinstance(e, RewardError):
        return short(msg)
    return short(f"{type(e).__name__}: {msg}" if msg else type(e).__name__)

"""Finding reward plugins: by registered name, `module:function`, `path/to/file.py:function`,
or the `vlrl.rewards` entry-point group of installed packages.

Every lookup ends in a `RewardSpec`, checked against the contract in `rewards.api`.
Worker processes find the same object again through a `PluginRef` (module or file plus
qualified name), so a plugin loaded from a file path also loads in the process pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from rewards.api import SPEC_ATTR, PluginError, RewardSpec, build_spec

ENTRY_POINT_GROUP = "vlrl.rewards"
_BUILTIN_MODULES = ("rewards.rules", "rewards.terms", "rewards.steps", "rewards.models")


class PluginRef(NamedTuple):
    """How a worker process imports a plugin object: ("module", name, qualname), ("file", path,
    qualname), or ("main", path of the parent's script, qualname)."""

    kind: str
    where: str
    qualname: str


class Registry:
    """Named reward plugins. The module-level `REGISTRY` is the one `@reward` fills."""

    def __init__(self) -> None:
        self._specs: dict[str, RewardSpec] = {}

    def add(self, spec: RewardSpec) -> None:
        if getattr(spec.obj, "__module__", None) not in _BUILTIN_MODULES:
            # A plugin taking a built-in's name must be refused now, at its own import: found
            # later, the clash breaks the built-ins' import and is blamed on them.
            load_builtins()
        old = self._specs.get(spec.name)
        if old is not None and old.source != spec.source and not _same_definition(old.obj, spec.obj):
            raise PluginError(f"{spec.label}: the name {spec.name!r} is already taken by {old.source}; pick another name")
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._specs)

    def specs(self) -> list[RewardSpec]:
        return [self._specs[n] for n in self.names()]

    def get(self, name: str) -> RewardSpec | None:
        load_builtins()
        return self._specs.get(name)

    def resolve(self, ref: str) -> RewardSpec:
        """A spec for `ref`: a registered name, an entry point, `module:function` or `file.py:function`."""
        ref = ref.strip()
        if ":" in ref and not _is_windows_drive(ref):
            return _resolve_path(ref)
        spec = self.get(ref)
        if spec is not None:
            return spec
        eps = entry_points()
        if ref in eps:
            ep = eps[ref]
            try:
                obj = ep.load()
            except Exception as e:
                raise PluginError(f"reward plugin {ref!r} (entry point {ep.value}): cannot load: {type(e).__name__}: {e}") from e
            return _spec_for(obj, name=ref, source=f"entry point {ref} = {ep.value}")
        known = self.names() + sorted(set(eps) - set(self._specs))
        raise PluginError(
            f"unknown reward plugin {ref!r}: not a registered name, entry point, module:function or file.py:function. "
            f"Known names: {', '.join(known)}"
        )

    @contextlib.contextmanager
    def scoped(self) -> Iterator["Registry"]:
        """Registrations made inside the block are undone after it (for tests)."""
        load_builtins()
        saved = dict(self._specs)
        try:
            yield self
        finally:
            self._specs = saved


REGISTRY = Registry()
_loaded_builtins = False


def load_builtins() -> None:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _is_windows_drive(ref: str) -> bool:
    return len(ref) > 2 and ref[1] == ":" and ref[2] in "\\/"


def _resolve_path(ref: str) -> RewardSpec:
    where, _, qualname = ref.rpartition(":")
    if not where or not qualname:
        raise PluginError(f"reward plugin {ref!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            module = load_file_module(where)
        else:
            module = importlib.import_module(where)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"reward plugin {ref!r}: cannot import {where!r}: {type(e).__name__}: {e}{_module_hint(e, where, qualname)}") from e
    obj: Any = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"reward plugin {ref!r}: {where!r} has no attribute {qualname!r}")
        obj = getattr(obj, part)
    return _spec_for(obj, name=None, source=ref)


def _module_hint(e: Exception, where: str, qualname: str) -> str:
    """`my_rewards:f` beside my_rewards.py fails from the `vlrl` command, whose sys.path has
    no current directory (unlike `python script.py`): point at the file form."""
    file = Path(*where.split(".")).with_suffix(".py")
    if isinstance(e, ModuleNotFoundError) and e.name == where.split(".")[0] and file.is_file():
        return f" ({file} is here, but a module must be importable: installed or on PYTHONPATH; name the file instead: {file}:{qualname})"
    return ""


def _spec_for(obj: Any, *, name: str | None, source: str) -> RewardSpec:
    spec = getattr(obj, SPEC_ATTR, None)
    if isinstance(spec, RewardSpec) and spec.obj is obj:
        return dataclasses.replace(spec, source=source) if name is None else dataclasses.replace(spec, source=source, name=name)
    return build_spec(obj, name=name, source=source)


# --------------------------------------------------------------------------------------
# Plugins defined in a file: one module per absolute path, the same name in every process.

_FILE_MODULES: dict[str, str] = {}  # module name -> absolute path


def file_module_name(path: str | Path) -> str:
    p = Path(path).resolve()
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in p.stem)
    return f"vlrl_reward_plugin_{stem}_{digest}"


def load_file_module(path: str | Path):
    p = Path(path).resolve()
    if not p.is_file():
        raise PluginError(f"reward plugin file {str(path)!r} does not exist (resolved to {p})")
    name = file_module_name(p)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise PluginError(f"reward plugin file {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _FILE_MODULES[name] = str(p)
    if str(p.parent) not in sys.path:
        # its imports of the modules beside it work, as under `python file.py`; appended, so
        # a file there cannot shadow an installed package
        sys.path.append(str(p.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        _FILE_MODULES.pop(name, None)
        raise
    return module


def source_of(obj: Any) -> str:
    """`module:qualname` of `obj`, or `path/file.py:qualname` for a plugin file (its module
    name is ours, not one the user wrote)."""
    module = getattr(obj, "__module__", None) or "?"
    return f"{_FILE_MODULES.get(module, module)}:{getattr(obj, '__qualname__', repr(obj))}"


def plugin_ref(obj: Any) -> PluginRef | None:
    """How another process finds `obj`; None when it cannot (lambdas, closures, interactive code)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    if module in _FILE_MODULES:
        return PluginRef("file", _FILE_MODULES[module], qualname)
    if module == "__main__":
        main = sys.modules.get("__main__")
        if not getattr(main, "__file__", None):
            return None
        return PluginRef("main", str(Path(main.__file__).resolve()), qualname)
    return PluginRef("module", module, qualname)


def load_ref(ref: PluginRef) -> Any:
    """The object a PluginRef names (used in worker processes)."""
    if ref.kind == "main":  # spawn imports the parent's script as __mp_main__ in workers
        mp_main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
        same = mp_main is not None and str(Path(getattr(mp_main, "__file__", "") or ".").resolve()) == ref.where
        module = mp_main if same else load_file_module(ref.where)
    elif ref.kind == "file":
        module = load_file_module(ref.where)
    else:
        module = importlib.import_module(ref.where)
    obj: Any = module
    for part in ref.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _same_definition(a: Any, b: Any) -> bool:
    """The same function or class, possibly imported twice (as a module and by file path)."""
    if getattr(a, "__qualname__", None) != getattr(b, "__qualname__", None):
        return False
    try:
        return Path(inspect.getsourcefile(a) or "").resolve() == Path(inspect.getsourcefile(b) or "").resolve()
    except TypeError:
        return False

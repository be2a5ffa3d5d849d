"""Plugin contract: declaration checks at load time, registry lookups, return-value checks."""

from __future__ import annotations

import math
from typing import Literal
import subprocess
import sys
from pathlib import Path

import pytest

from rewards import PluginError, RewardError, RewardSample, reward
from rewards.api import LazyImages, build_spec, check_batch, check_value
from rewards.registry import REGISTRY, Registry, plugin_ref

HERE = Path(__file__).resolve().parent


# ---- declaring


def test_decorator_registers_and_describes():
    with REGISTRY.scoped():

        @reward("my_reward", correct_at=1.0)
        def my_reward(sample: RewardSample, *, bonus: float = 0.5) -> float:
            """Says hello."""
            return bonus

        spec = REGISTRY.get("my_reward")
        assert spec.options == ("bonus",) and spec.required == ()
        assert spec.correct_at == 1.0 and spec.isolate and not spec.batched and not spec.is_async
        assert spec.description == "Says hello."
    assert REGISTRY.get("my_reward") is None  # scoped() undid it


def test_forms_are_detected():
    async def a(sample) -> float:
        return 1.0

    def b(samples: list[RewardSample]) -> list[float]:
        return [1.0]

    class C:
        def __init__(self, *, k: int):
            self.k = k

        def __call__(self, sample) -> float:
            return 1.0

    sa, sb, sc = (build_spec(f, source="t") for f in (a, b, C))
    assert sa.is_async and not sa.isolate  # async plugins run on the event loop by default
    assert sb.batched
    assert sc.is_class and sc.options == ("k",) and sc.required == ("k",)


@pytest.mark.parametrize(
    "src, message",
    [
        ("def f():\n    return 1.0", "must take the sample"),
        ("def f(sample, other):\n    return 1.0", "only the sample may be positional"),
        ("def f(sample) -> str:\n    return 'x'", "annotation says str"),
        ("def f(sample) -> list[float]:\n    return [1.0]", "annotation says"),
        ("def f(sample):\n    yield 1.0", "not be a generator"),
        ("class f:\n    pass", "no __call__"),
    ],
)
def test_wrong_signature_or_return_type_is_reported_at_load_time(src, message):
    ns: dict = {}
    exec(src, ns)
    with pytest.raises(PluginError) as e:
        reward("bad_plugin", register=False)(ns["f"])
    assert "'bad_plugin'" in str(e.value) and message in str(e.value)


def test_batched_return_annotation_is_checked():
    with pytest.raises(PluginError, match="batched plugins return"):

        @reward("b", batched=True, register=False)
        def b(samples) -> float:
            return 1.0


def test_options_are_checked_against_the_signature():
    @reward("opt", register=False)
    def opt(sample, *, need: int, maybe: int = 1) -> float:
        return 1.0

    spec = opt.__vlrl_reward__
    with pytest.raises(PluginError, match="unknown option"):
        spec.check_args({"need": 1, "typo": 2})
    with pytest.raises(PluginError, match="required"):
        spec.check_args({})
    assert spec.make_callable({"need": 2})(RewardSample(response="x")) == 1.0


def test_option_values_are_checked_against_their_annotations():
    """A recipe's `unit: 5` or `n: "4"` would reach the plugin as is and fail every sample."""

    class Scorer:
        def __init__(self, *, scale: float = 1.0):
            self.scale = scale

        def __call__(self, sample) -> float:
            return self.scale

    @reward("typed", register=False)
    def typed(sample, *, n: int = 1, unit: str = "cm", box: tuple[float, float] = (0.0, 1.0),
              path: Path | None = None, mode: Literal["a", "b"] = "a", free=None) -> float:
        return 1.0

    spec = typed.__vlrl_reward__
    for ok in [{"n": 4}, {"unit": "mm"}, {"box": [0, 1]}, {"path": "models/rm"}, {"path": None}, {"mode": "b"}, {"free": [1, "x"]}]:
        spec.check_args(ok)
    for bad, said in [({"n": "4"}, "option 'n' = '4': expected int"), ({"n": True}, "expected int"),
                      ({"unit": 5}, "option 'unit' = 5: expected str"), ({"box": [0, 1, 2]}, "option 'box'"),
                      ({"mode": "c"}, "option 'mode' = 'c'")]:
        with pytest.raises(PluginError, match=said):
            spec.check_args(bad)
    cls_spec = build_spec(Scorer, source="test")
    cls_spec.check_args({"scale": 2})  # an int where a float is annotated
    with pytest.raises(PluginError, match="option 'scale' = 'x': expected float"):
        cls_spec.check_args({"scale": "x"})


def test_name_clash_is_an_error():
    with REGISTRY.scoped():

        @reward("clash")
        def one(sample) -> float:
            return 1.0

        with pytest.raises(PluginError, match="already taken"):

            @reward("clash")
            def two(sample) -> float:
                return 2.0


def test_plugin_taking_a_builtin_name_is_refused_at_its_own_import(tmp_path):
    """In a fresh process (built-ins not loaded yet), the clash names the user's file and
    component, not the built-in's import and an unrelated component."""
    f = tmp_path / "mine.py"
    f.write_text("from rewards import reward\n\n@reward('format')\ndef myformat(sample) -> float:\n    return 1.0\n")
    code = (
        "from rewards import RewardStack\n"
        "try:\n"
        f"    RewardStack.from_config({{'components': {{'mine': {str(f) + ':myformat'!r}, 'acc': 'math_accuracy'}}, 'workers': 0}})\n"
        "except Exception as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("rewards.components.mine: ") and f"{f}:myformat" in out.stdout, out.stdout
    assert "already taken by rewards.rules:format_reward" in out.stdout, out.stdout


def test_load_errors_name_the_plugin_file(tmp_path):
    f = tmp_path / "sig.py"
    f.write_text("from rewards import reward\n\n@reward('sig_plugin')\ndef noargs():\n    return 1.0\n")
    with REGISTRY.scoped(), pytest.raises(PluginError) as e:
        REGISTRY.resolve(f"{f}:noargs")
    assert f"({f}:noargs)" in str(e.value) and "vlrl_reward_plugin" not in str(e.value)


# ---- finding plugins


def test_resolve_builtin_module_and_file():
    assert REGISTRY.resolve("math_accuracy").name == "math_accuracy"
    spec = REGISTRY.resolve("rewards.rules:exact_match")
    assert spec.name == "exact_match" and spec.source == "rewards.rules:exact_match"
    spec = REGISTRY.resolve(f"{HERE / 'rewards_sample_plugins.py'}:undecorated")
    assert spec.make_callable({})(RewardSample(response="x")) == 0.75
    assert plugin_ref(spec.obj).kind == "file"


def test_unknown_name_lists_known_ones():
    with pytest.raises(PluginError) as e:
        REGISTRY.resolve("no_such_reward")
    assert "math_accuracy" in str(e.value)
    with pytest.raises(PluginError, match="no attribute"):
        REGISTRY.resolve("rewards.rules:nope")
    with pytest.raises(PluginError, match="does not exist"):
        REGISTRY.resolve("missing/file.py:f")


def test_module_form_for_a_file_here_points_at_the_file_form(tmp_path, monkeypatch):
    (tmp_path / "here_rewards.py").write_text("def f(sample):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)  # as the `vlrl` command sees it: the current directory is not on sys.path
    with pytest.raises(PluginError) as e:
        REGISTRY.resolve("here_rewards:f")
    assert "No module named 'here_rewards'" in str(e.value) and "name the file instead: here_rewards.py:f" in str(e.value)
    assert REGISTRY.resolve("here_rewards.py:f").make_callable({})(RewardSample(response="x")) == 1.0


def test_a_plugin_file_imports_the_modules_beside_it(tmp_path, monkeypatch):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "beside_helpers.py").write_text("def half(sample):\n    return 0.5\n")
    (tmp_path / "plug" / "beside.py").write_text("from beside_helpers import half\n\ndef f(sample):\n    return half(sample)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = REGISTRY.resolve(f"{tmp_path / 'plug' / 'beside.py'}:f")
    assert spec.make_callable({})(RewardSample(response="x")) == 0.5
    assert sys.path[-1] == str(tmp_path / "plug")  # after the installed packages
    sys.modules.pop("beside_helpers", None)


def test_entry_point_group(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "myrewards_pkg").mkdir(parents=True)
    (pkg / "myrewards_pkg" / "__init__.py").write_text("def shout(sample):\n    return float(sample.response.isupper())\n")
    dist = pkg / "myrewards_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myrewards-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vlrl.rewards]\nshout = myrewards_pkg:shout\n")
    monkeypatch.syspath_prepend(str(pkg))
    spec = Registry().resolve("shout")
    assert spec.source.startswith("entry point shout")
    assert spec.make_callable({})(RewardSample(response="HEY")) == 1.0


def test_plugin_ref_refuses_closures():
    def inner(sample):
        return 1.0

    assert plugin_ref(inner) is None
    assert plugin_ref(lambda s: 1.0) is None


# ---- values


@pytest.mark.parametrize("v, out", [(1, 1.0), (True, 1.0), (0.5, 0.5), (None, None), ({"a": 1, "b": None}, {"a": 1.0, "b": None})])
def test_check_value_accepts(v, out):
    assert check_value(v) == out


@pytest.mark.parametrize("v", [math.nan, math.inf, "1", [1.0], {"a": "x"}, {1: 1.0}, object(), 10**400])
def test_check_value_rejects(v):
    with pytest.raises(RewardError):
        check_value(v)


def test_check_batch_keeps_item_errors():
    out = check_batch([1.0, RewardError("bad"), "x"], 3)
    assert out[0] == 1.0 and isinstance(out[1], RewardError) and isinstance(out[2], RewardError)
    with pytest.raises(RewardError, match="2 values for 3"):
        check_batch([1.0, 2.0], 3)


def test_sample_defaults_and_lazy_images(tmp_path):
    from PIL import Image

    p = tmp_path / "a.png"
    Image.new("RGB", (4, 3), "red").save(p)
    s = RewardSample(response="a b c", images=[str(p)], prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}])
    assert s.response_length == 3 and s.question == "what?"
    assert isinstance(s.images, LazyImages) and s.images[0].size == (4, 3)
    assert RewardSample(response="x", response_ids=[1, 2, 3, 4]).response_length == 4
    import pickle

    assert pickle.loads(pickle.dumps(s)).images.sources == [str(p)]


def test_same_plugin_imported_as_module_and_by_path_is_not_a_clash(tmp_path, monkeypatch):
    (tmp_path / "twice_mod.py").write_text("from rewards import reward\n\n@reward('twice_plugin')\ndef twice(sample) -> float:\n    return 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with REGISTRY.scoped():
        import importlib

        importlib.import_module("twice_mod")
        spec = REGISTRY.resolve(f"{tmp_path / 'twice_mod.py'}:twice")
        assert spec.make_callable({})(RewardSample(response="x")) == 2.0
    sys.modules.pop("twice_mod", None)

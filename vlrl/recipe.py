"""The recipe: one YAML file that chains every stage of a post-training run.

Each stage is a pydantic model with `extra="forbid"`, so a misspelt key fails at
`vlrl validate`, before any compute is spent. The stage configs live here, in the
kernel, rather than in each component, because the runner must validate the whole
chain (every `from:` and `data:` reference) without importing trainers.

Errors are one line: `recipe.yaml: stages.pretrain.phases.0.lr: got 'abc', expected a
number`. The recipe is never mutated after validation; overrides are applied to the
raw mapping first and validated together with it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from vlrl.errors import RecipeError, validation_line
from vlrl.recipe_base import DataSelect, EvalSpec, FamilyWeights, OptimSpec, TrackingSpec, TrainerPrecision, _StageBase, _Strict  # noqa: F401 (re-exported)
from vlrl.recipe_rl import RlStage
from vlrl.recipe_sft import MergeStage, SftStage

STAGE_KINDS = ("data", "model", "pretrain", "sft", "rl", "merge", "eval")
BUILT_KINDS = ("data", "model", "pretrain", "eval", "rl", "sft", "merge")


# --------------------------------------------------------------------------- stages


class DataStage(_StageBase):
    """Makes the synthetic task world, or points at an existing dataset folder."""

    kind: Literal["data"] = "data"
    path: str | None = Field(None, description="an existing dataset folder (train.* and eval.*) instead of generating one")
    seed: int = 0
    n: int = Field(4000, ge=1, description="train records")
    n_eval: int = Field(300, ge=1, description="held-out eval records")
    format: Literal["jsonl", "parquet"] = "jsonl"
    mix: FamilyWeights | None = Field(None, description="share of each family in the generated data")
    exclude: list[str] = Field(
        default_factory=list,
        description="earlier data stages whose eval records this stage's train split must not contain (a corpus generated beside a held-out set)",
    )

    @model_validator(mode="after")
    def _exclude_needs_generation(self) -> "DataStage":
        if self.path is not None and self.exclude:
            raise ValueError("exclude applies to generated data; a dataset at `path` is used as it is: remove one of them")
        return self


class VisionPretrainSpec(_Strict):
    steps: int = Field(400, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    families: list[Literal["perception", "reasoning"]] = Field(
        default_factory=lambda: ["perception"], min_length=1, description="whose scenes label the tower's patches"
    )


class ModelStage(_StageBase):
    """Builds the in-repo tiny model, or points at a local Hugging Face checkpoint."""

    kind: Literal["model"] = "model"
    preset: Literal["tiny", "micro"] = Field("tiny", description="a size of vlrl/model/tiny.py TINY_PRESETS (named here so that a typo fails at validate)")
    path: str | None = Field(None, description="a local checkpoint folder (e.g. Qwen2.5-VL-3B-Instruct) instead of a tiny model")
    corpus_size: int = Field(20000, ge=100, description="texts for training the tiny tokenizer")
    seed: int = 0
    vision_pretrain: VisionPretrainSpec | None = Field(
        None, description="tiny model only: pretrain the vision tower on scene labels (vlrl/model/vision_pretrain.py), as real VLMs start from a pretrained ViT"
    )

    @model_validator(mode="after")
    def _tiny_only(self) -> "ModelStage":
        if self.path is not None and self.vision_pretrain is not None:
            raise ValueError("vision_pretrain is for the tiny model only (a checkpoint at `path` brings its own pretrained tower): remove one of them")
        return self



class Phase(_Strict):
    """One pretraining phase (MindVL-style): which parameters train, on which data."""

    name: str
    trainable: Literal["all", "language", "vision", "vision+projector", "projector"] = "all"
    select: DataSelect = Field(default_factory=DataSelect)
    loss_on: Literal["all", "assistant"] = "assistant"
    steps: int = Field(..., ge=1)
    batch_size: int | None = Field(None, ge=1)
    optim: OptimSpec | None = None  # None = the stage's optim
    data: str | None = Field(None, description="a data stage or folder this phase draws from instead of the stage's `data` (MindVL: each phase its own corpus)")


class PretrainStage(_StageBase, TrainerPrecision):
    kind: Literal["pretrain"] = "pretrain"
    from_: str = Field(..., alias="from")
    data: str
    phases: list[Phase] = Field(..., min_length=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable checkpoints")
    log_every: int = Field(10, ge=1)
    on_bad_image: Literal["error", "skip"] = "error"
    seed: int | None = None


class EvalStage(_StageBase):
    kind: Literal["eval"] = "eval"
    from_: str = Field(..., alias="from")
    data: str | None = None
    split: str = "eval"
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(64, ge=1)


Stage = Annotated[
    Union[DataStage, ModelStage, PretrainStage, SftStage, RlStage, MergeStage, EvalStage],
    Field(discriminator="kind"),
]


class Recipe(_Strict):
    name: str
    run_dir: str | None = Field(None, description="default: runs/<name>, relative to the recipe's working directory")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: all cores)")
    parallel: int = Field(
        1, ge=1, description="stages run at once, each in its own process, when their inputs are ready; the cores (and accelerators) are shared among them (vlrl/stage_pool.py)"
    )
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    stages: dict[str, Stage]

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults_to_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("stages"), dict):
            stages = {}
            for name, st in data["stages"].items():
                if isinstance(st, dict) and "kind" not in st and name in STAGE_KINDS:
                    st = {"kind": name, **st}
                stages[name] = st
            data = {**data, "stages": stages}
        return data

    # ---- derived, never stored back into the recipe

    def stage_names(self) -> list[str]:
        return list(self.stages)

    def base_dir(self, cwd: Path | None = None) -> Path:
        base = Path(self.run_dir) if self.run_dir else Path("runs") / self.name
        return base if base.is_absolute() else (cwd or Path.cwd()) / base

    def stage_fingerprint(self, name: str) -> str:
        """Hash of a stage's config: a completed stage whose config changed is reported, not silently reused.
        Keys left at their defaults are not hashed, so a new optional key in a later vlrl
        does not mark every finished stage as changed."""
        blob = json.dumps(self.stages[name].model_dump(mode="json", by_alias=True, exclude_defaults=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def _fmt_loc(loc: tuple[Any, ...], raw: dict) -> str:
    """Dotted key path, without the discriminator tag pydantic inserts for stages, nor the
    '[key]' it appends when a mapping's key (not its value) is wrong."""
    parts = [p for p in loc if p != "[key]"]
    if len(parts) >= 3 and parts[0] == "stages" and parts[2] in STAGE_KINDS:
        st = raw.get("stages", {}).get(parts[1]) if isinstance(raw.get("stages"), dict) else None
        kind = (st or {}).get("kind", parts[1]) if isinstance(st, dict) else None
        if parts[2] == kind:
            del parts[2]
    return ".".join(str(p) for p in parts)


def _expected(err: dict) -> str | None:
    """The stage-kind errors in words; None: validation_line's wording."""
    if err["type"] == "union_tag_invalid":
        return f"unknown stage kind; expected one of {', '.join(STAGE_KINDS)}"
    if err["type"] == "union_tag_not_found":
        return f"stage needs a 'kind' (one of {', '.join(STAGE_KINDS)})"
    return None


def _format_validation(e: ValidationError, raw: dict, source: str) -> str:
    errs = e.errors()
    first = errs[0]
    loc = _fmt_loc(first["loc"], raw)
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc += ".kind"
    return f"{source}: {validation_line(errs, loc or '<top>', _expected(first))}"


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping; in a recipe that silently drops
    a stage copied and not renamed, or the first of two `phases:` lists. Keys brought in by a
    merge (`<<: *sft`) may still be overridden: only keys written in the mapping count."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    line = first.setdefault(key, key_node.start_mark.line)
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error follows
                if line != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first at line {line + 1}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key.path=value (e.g. pretrain.optim.lr=3e-4)")
    key, value = item.split("=", 1)
    if not key:
        raise RecipeError(f"override {item!r}: empty key")
    try:
        return key.split("."), yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); quote it or fix it") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted `key=value` overrides to the raw recipe mapping (a deep copy).

    A first key that names a stage is looked up under `stages`, so
    `pretrain.optim.lr=3e-4` works as well as `stages.pretrain.optim.lr=3e-4`.
    """
    data = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    top_fields = set(Recipe.model_fields)
    for item in overrides:
        path, value = parse_override(item)
        if path[0] not in top_fields:
            stages = data.get("stages") if isinstance(data.get("stages"), dict) else {}
            if path[0] not in stages:
                # Said here rather than by validation, which would blame the recipe file for a key it does not hold.
                raise RecipeError(
                    f"override {item!r}: {path[0]!r} is neither a stage ({', '.join(stages) or 'none'}) nor a top-level key ({', '.join(Recipe.model_fields)})"
                )
            path = ["stages", *path]
        node: Any = data
        for i, key in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise RecipeError(f"override {item!r}: {where}: expected a list index below {len(node)}")
                node = node[int(key)]
            elif isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                raise RecipeError(f"override {item!r}: {where}: is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"override {item!r}: expected a list index below {len(node)}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"override {item!r}: {'.'.join(path[:-1])}: is a value, not a section")
    return data


def looks_like_path(ref: str) -> bool:
    """References with a slash or a leading '.'/'~' are paths; bare words are stage names."""
    return "/" in ref or ref.startswith((".", "~"))


MODEL_REF_KINDS = ("model", "pretrain", "sft", "rl", "merge")


def _path_problem(ref: str, need: str) -> str | None:
    """What keeps a path from serving as `need` ('checkpoint', or the dataset splits it must
    hold, 'train+eval'), or None. Only names and files are looked at, nothing is loaded."""
    p = Path(ref).expanduser()
    if not p.exists():
        return "does not exist"
    if need == "checkpoint":
        if p.is_file():
            return "is a file: expected a checkpoint folder (a Hugging Face model directory holding config.json)"
        return None if (p / "config.json").is_file() else "is not a checkpoint folder (no config.json in it): expected a Hugging Face model directory"
    from vlrl.data.io import FORMATS

    if p.is_file():
        return None if p.suffix in FORMATS else f"is not a record file: expected {' or '.join(FORMATS)}, or a dataset folder"
    for split in need.split("+"):
        if not any((p / f"{split}{ext}").is_file() for ext in FORMATS):
            return f"holds no {' or '.join(split + ext for ext in FORMATS)}: expected a dataset folder"
    return None


def _check_references(recipe: Recipe, source: str) -> None:
    """Every `from:` names an earlier stage that yields a model, every `data:` a data stage or
    folder; a path given instead is checked for what the stage will read there (a checkpoint,
    a dataset split), so that a wrong folder fails here rather than when its stage starts."""
    seen: dict[str, str] = {}
    for name, st in recipe.stages.items():
        trains = st.kind in ("pretrain", "sft", "rl")
        # (key, reference, stage kinds it may name, what a path must hold)
        refs: list[tuple[str, str | None, tuple[str, ...], str]] = []
        if hasattr(st, "from_"):
            refs.append(("from", st.from_, MODEL_REF_KINDS, "checkpoint"))
        for i, part in enumerate(getattr(st, "parts", None) or []):
            refs.append((f"from.{i}", part, MODEL_REF_KINDS, "checkpoint"))
        if getattr(st, "data", None) is not None:
            refs.append(("data", st.data, ("data",), "train" if trains else getattr(st, "split", recipe.eval.split)))
        for i, phase in enumerate(getattr(st, "phases", None) or []):
            if getattr(phase, "data", None) is not None:
                refs.append((f"phases.{i}.data", phase.data, ("data",), "train"))
        for i, ref in enumerate(getattr(st, "exclude", None) or []):
            refs.append((f"exclude.{i}", ref, ("data",), "eval"))
        ev = st.eval if isinstance(st.eval, EvalSpec) else None
        if ev and ev.data:
            refs.append(("eval.data", ev.data, ("data",), ev.split))
        for key, ref, kinds, need in refs:
            if ref is None:
                continue
            if ref == name:
                raise RecipeError(f"{source}: stages.{name}.{key}: a stage cannot read its own output; name an earlier stage")
            if ref in seen:
                if seen[ref] not in kinds:
                    raise RecipeError(
                        f"{source}: stages.{name}.{key}: stage {ref!r} is a {seen[ref]} stage; expected one of kind {', '.join(kinds)}"
                    )
                continue
            if ref in recipe.stages:
                raise RecipeError(f"{source}: stages.{name}.{key}: stage {ref!r} comes after {name!r}; a stage can only use earlier stages")
            before = ", ".join(seen) or "none"
            if not looks_like_path(ref):
                raise RecipeError(f"{source}: stages.{name}.{key}: {ref!r} names no earlier stage (earlier: {before}); a path needs a '/' (e.g. ./{ref})")
            if problem := _path_problem(ref, need):
                raise RecipeError(f"{source}: stages.{name}.{key}: path {ref!r} {problem}")
        own = getattr(st, "path", None)
        if own is not None and (problem := _path_problem(own, "checkpoint" if st.kind == "model" else "train+eval")):
            raise RecipeError(f"{source}: stages.{name}.path: {own!r} {problem}")
        seen[name] = st.kind
    ref = recipe.eval.data
    if ref is not None and ref not in seen:
        if not looks_like_path(ref):
            raise RecipeError(f"{source}: eval.data: {ref!r} is neither a data stage nor a path (with a '/')")
        if problem := _path_problem(ref, recipe.eval.split):
            raise RecipeError(f"{source}: eval.data: path {ref!r} {problem}")


def validate_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_validation(e, raw, source)) from None
    _check_references(recipe, source)
    return recipe


# Checks of what a stage's schema passes through unchecked (the RL stage's reward plugins),
# run by `vlrl validate` and before any stage starts: `check(stage config, "stages.<name>") -> lines to show`.
STAGE_CHECKS: dict[str, str] = {
    "rl": "rlhf.reward_config:check_stage",
}


def check_stages(recipe: Recipe, names: list[str] | None = None, source: str | None = None) -> list[str]:
    """The STAGE_CHECKS of the named stages (default: all); a RecipeError names the key (and
    `source`, the recipe file, when given)."""
    notes = []
    for name in recipe.stages if names is None else names:
        st = recipe.stages[name]
        if st.kind in STAGE_CHECKS:
            module, fn = STAGE_CHECKS[st.kind].split(":")
            try:
                notes += getattr(importlib.import_module(module), fn)(st, f"stages.{name}")
            except RecipeError as e:
                if source is None:
                    raise
                raise RecipeError(f"{source}: {e}") from None
    return notes


def read_recipe_file(path: str | Path) -> Any:
    """The recipe file's raw YAML data, or a RecipeError naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    raw = read_recipe_file(path)
    if overrides:
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: expected a mapping at the top level")
        raw = apply_overrides(raw, overrides)
    return validate_recipe(raw, str(path))

"""Weight merging: a weighted average of checkpoints of one architecture.

MindVL averages SFT runs trained at different sequence lengths / max_pixels; the
merge stage does that for any checkpoints of the same config, and writes the
merged checkpoint's eval beside its parts' (`compare.json`, `compare.md`).

Averaging happens in float32 tensor by tensor (one safetensors file at a time),
then is cast back to each tensor's dtype. Config fields that only record
provenance (`_name_or_path`, `transformers_version`) may differ; any other
difference is refused, as are differing tensor names or shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from vlrl.errors import VlrlError

PROVENANCE_KEYS = {"_name_or_path", "transformers_version"}


def _tensor_files(ckpt: Path) -> dict[str, str]:
    """tensor name -> file name, for single-file and sharded checkpoints."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise VlrlError(f"merge: {ckpt} has no *.safetensors weights: expected a Hugging Face checkpoint folder")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f.name for k in fh.keys()})
    return out


def _config(ckpt: Path) -> dict:
    p = ckpt / "config.json"
    if not p.is_file():
        raise VlrlError(f"merge: {ckpt} has no config.json: expected a Hugging Face checkpoint folder")
    return json.loads(p.read_text())


def _first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in PROVENANCE_KEYS and not path:
                continue
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"


def check_compatible(paths: list[Path]) -> list[dict[str, str]]:
    """Tensor maps of the checkpoints, after checking configs, names and shapes agree."""
    first = paths[0]
    cfg0, maps = _config(first), [_tensor_files(p) for p in paths]
    for p, m in zip(paths[1:], maps[1:]):
        diff = _first_difference(cfg0, _config(p))
        if diff:
            raise VlrlError(f"merge: checkpoint {p}: config.json differs from {first} at {diff}")
        missing = sorted(set(maps[0]) - set(m))
        extra = sorted(set(m) - set(maps[0]))
        if missing or extra:
            what = f"lacks tensor {missing[0]}" if missing else f"has extra tensor {extra[0]}"
            raise VlrlError(f"merge: checkpoint {p} {what} (compared with {first})")
    shapes0 = _shapes(first, maps[0])
    for p, m in zip(paths[1:], maps[1:]):
        for k, shape in _shapes(p, m).items():
            if shape != shapes0[k]:
                raise VlrlError(f"merge: checkpoint {p}: tensor {k} has shape {tuple(shape)} but {first} has {tuple(shapes0[k])}")
    return maps


def _shapes(ckpt: Path, tensor_map: dict[str, str]) -> dict[str, list[int]]:
    out = {}
    for fname in sorted(set(tensor_map.values())):
        with safe_open(str(ckpt / fname), framework="pt") as fh:
            for k in fh.keys():
                out[k] = list(fh.get_slice(k).get_shape())
    return out


def normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise VlrlError(f"merge: {len(weights)} weights for {n} checkpoints; give one weight per checkpoint")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise VlrlError(f"merge: weights must be non-negative with a positive sum, got {weights}")
    s = sum(weights)
    return [w / s for w in weights]


def merge_checkpoints(paths: list[str | Path], out: str | Path, weights: list[float] | None = None) -> Path:
    """Write the weighted average of `paths` to `out` (a new folder; processor, tokenizer
    and config copied from the first checkpoint). Returns `out`."""
    paths = [Path(p).expanduser() for p in paths]
    if len(paths) < 2:
        raise VlrlError(f"merge: need at least two checkpoints, got {len(paths)}")
    for p in paths:
        if not p.is_dir():
            raise VlrlError(f"merge: checkpoint {p} is not a folder")
    w = normalise_weights(weights, len(paths))
    maps = check_compatible(paths)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in paths[0].iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, tmp / f.name)
    for fname in sorted(set(maps[0].values())):
        keys = [k for k, v in maps[0].items() if v == fname]
        merged = {}
        for k in keys:
            acc, dtype = None, None
            for p, m, wi in zip(paths, maps, w):
                with safe_open(str(p / m[k]), framework="pt") as fh:
                    t = fh.get_tensor(k)
                dtype = dtype or t.dtype
                acc = t.float() * wi if acc is None else acc.add_(t.float(), alpha=wi)
            merged[k] = acc.to(dtype).contiguous()
        save_file(merged, str(tmp / fname), metadata={"format": "pt"})
    (tmp / "vlrl_merge.json").write_text(json.dumps({"parts": [str(p) for p in paths], "weights": w}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- the stage


def _part_paths(ctx) -> list[tuple[str, Path]]:
    from vlrl.runner import MODEL_KINDS, is_complete, stage_output

    base = ctx.dir.parent
    recipe = ctx.recipe
    names = list(recipe.stages)
    out = []
    for i, ref in enumerate(ctx.config.parts):
        where = f"stages.{ctx.name}.from.{i}"
        if ref in recipe.stages:
            if names.index(ref) >= names.index(ctx.name):
                raise VlrlError(f"{where}: stage {ref!r} comes after {ctx.name!r}; a stage can only use earlier stages")
            if recipe.stages[ref].kind not in MODEL_KINDS:
                raise VlrlError(f"{where}: stage {ref!r} is a {recipe.stages[ref].kind} stage; expected one of kind {', '.join(MODEL_KINDS)}")
            if not is_complete(base / ref) and not getattr(recipe.stages[ref], "path", None):
                raise VlrlError(f"{where}: stage {ref!r} is not complete; run `vlrl run` or `vlrl stage {ref}` first")
            out.append((ref, stage_output(recipe, ref, base)))
        else:
            p = Path(ref).expanduser()
            if not p.is_dir():
                raise VlrlError(f"{where}: {ref!r} names no stage and is not a checkpoint folder")
            out.append((ref, p))
    return out


def _part_eval(ctx, name: str, ckpt: Path, data_file: Path, spec, n: int, i: int) -> dict:
    """The part's own eval.json when it covers the same data file and count, else a fresh eval."""
    from vlrl.eval import evaluate

    own = ctx.dir.parent / name / "eval.json"
    if name in ctx.recipe.stages and own.is_file():
        rep = json.loads(own.read_text())
        if rep.get("data") == str(data_file) and rep.get("n") == n:
            return {"accuracy": rep["accuracy"], "by_family": rep["by_family"], "n": rep["n"], "source": str(own)}
    report = evaluate(ckpt, data_file, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens, limit=spec.limit, device=ctx.device.kind)
    path = report.to_json(ctx.dir / "parts" / f"{i}-eval.json")
    return {"accuracy": report.accuracy, "by_family": report.by_family, "n": report.n, "source": str(path)}


def compare_table(rows: list[dict]) -> str:
    """Markdown: one row per part and one for the merge, accuracy % overall and by family."""
    fams = sorted({f for r in rows for f in r["by_family"]})
    head = "| checkpoint | weight | all % | " + " | ".join(f"{f} %" for f in fams) + " | n |"
    lines = [head, "|" + "---|" * (4 + len(fams))]
    for r in rows:
        weight = "" if r.get("weight") is None else f"{r['weight']:.3g}"
        cells = " | ".join(f"{100 * r['by_family'][f]:.1f}" if f in r["by_family"] else "" for f in fams)
        lines.append(f"| {r['name']} | {weight} | {100 * r['accuracy']:.1f} | {cells} | {r['n']} |")
    return "\n".join(lines) + "\n"


def run_stage(ctx) -> dict:
    from vlrl.data.io import split_path
    from vlrl.runner import eval_spec_for, stage_output
    from vlrl.stages import eval_checkpoint

    cfg = ctx.config
    parts = _part_paths(ctx)
    weights = normalise_weights(cfg.weights, len(parts))
    out = merge_checkpoints([p for _, p in parts], ctx.checkpoint_dir, weights)
    ctx.console.print(f"merged {len(parts)} checkpoints ({', '.join(f'{n} x{w:.3g}' for (n, _), w in zip(parts, weights))}) into {out}")
    summary: dict = {"parts": [n for n, _ in parts], "weights": weights}
    spec = eval_spec_for(ctx.recipe, ctx.name)
    if spec is None:
        return summary
    data_dir = stage_output(ctx.recipe, spec.data, ctx.dir.parent) if spec.data in ctx.recipe.stages else Path(spec.data)
    merged = eval_checkpoint(ctx, out, data_dir, spec)  # writes eval.json
    report = json.loads((ctx.dir / "eval.json").read_text())
    data_file = split_path(data_dir, spec.split)
    rows = [{"name": n, "weight": w, **_part_eval(ctx, n, p, data_file, spec, report["n"], i)}
            for i, ((n, p), w) in enumerate(zip(parts, weights))]
    rows.append({"name": f"{ctx.name} (merged)", "weight": None, **merged, "n": report["n"], "source": str(ctx.dir / "eval.json")})
    (ctx.dir / "compare.json").write_text(json.dumps(rows, indent=2))
    table = compare_table(rows)
    (ctx.dir / "compare.md").write_text(table)
    ctx.console.print(table)
    summary["compare"] = [{k: r[k] for k in ("name", "accuracy", "by_family")} for r in rows]
    summary["eval"] = merged
    return summary

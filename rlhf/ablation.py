"""`vlrl ablate RECIPE`: the hybrid RL terms one by one, from the same SFT checkpoint and
the same budget.

The recipe's RL stage (the one named by `--stage`, else its only `kind: rl` stage) is
the "all terms" configuration. Variants strip terms from it:
  plain      every hybrid term off (plain GRPO with the stage's algo settings)
  <term>     that term alone                     (terms the stage turns on only)
  all        the stage as written
Every variant measures the visual dependency (`algo.visual.metric: true`: two no-grad
forwards, no effect on the update). The stages the RL stage needs run once, as
`vlrl run` would (complete ones are skipped); each variant is then a one-stage recipe
in `<run_dir>/ablation/<variant>/` whose `from` and `data` are those stages' outputs, so
rerunning the command resumes where it stopped and skips finished variants.

Outputs in `<run_dir>/`: `ablation.json` ({"title", "columns", "rows"}: the run report
renders it), `ablation.md` (the table and the plots) and `ablation-<metric>.svg` (per
step, one line per variant).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from vlrl.errors import RecipeError

# term -> how to take it out of a raw rl stage mapping
TERMS = ("anchor", "visual", "diversity", "concise")
PAIRED = ("reasoning", "perception")  # families whose change is paired record by record against the start and plain
COLUMNS = [
    "variant", "reasoning_acc", "perception_acc", "eval_acc",
    *(f"{fam}_vs_{base}" for base in ("start", "plain") for fam in PAIRED),
    "visual_dependency", "distinct_2", "single_pattern_frac", "response_length", "reward", "train_seconds",
]
PLOTS = {  # metric -> plot title
    "acc/all": "train accuracy",
    "visual/dependency": "visual dependency",
    "diversity/distinct_2": "distinct-2 within groups",
    "response/length_mean": "mean response length (tokens)",
}


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def terms_on(stage: dict) -> list[str]:
    """The hybrid terms a raw rl stage mapping turns on."""
    on = []
    if (_get(stage, "algo", "perception_anchor", "kl_coef") or 0) > 0:
        on.append("anchor")
    if (_get(stage, "algo", "visual", "coef") or 0) > 0:
        on.append("visual")
    if (_get(stage, "reward_terms", "diversity", "weight") or 0) != 0:
        on.append("diversity")
    if (_get(stage, "reward_terms", "conciseness", "weight") or 0) != 0 or _get(stage, "rollout", "modes"):
        on.append("concise")
    return on


def strip_term(stage: dict, term: str) -> dict:
    """A copy of the raw rl stage with `term` off."""
    st = copy.deepcopy(stage)
    if term == "anchor":
        st.get("algo", {}).pop("perception_anchor", None)
    elif term == "visual":
        st.setdefault("algo", {}).setdefault("visual", {})["coef"] = 0.0
    elif term == "diversity":
        st.get("reward_terms", {}).pop("diversity", None)
    elif term == "concise":
        st.get("reward_terms", {}).pop("conciseness", None)
        st.get("rollout", {}).pop("modes", None)
    else:
        raise ValueError(f"unknown term {term!r}; terms: {', '.join(TERMS)}")
    return st


def variants(stage: dict, wanted: list[str] | None = None) -> dict[str, dict]:
    """variant name -> raw rl stage: plain, each term alone, all (with the visual metric on)."""
    on = terms_on(stage)
    if not on:
        raise RecipeError("ablate: the rl stage turns on no hybrid term (algo.perception_anchor, algo.visual, reward_terms, rollout.modes)")
    out: dict[str, dict] = {}
    names = ["plain", *on, "all"]
    for name in names:
        keep = set(on) if name == "all" else ({name} if name != "plain" else set())
        st = copy.deepcopy(stage)
        for t in on:
            if t not in keep:
                st = strip_term(st, t)
        st.setdefault("algo", {}).setdefault("visual", {})["metric"] = True
        out[name] = st
    if wanted:
        unknown = [w for w in wanted if w not in out]
        if unknown:
            raise RecipeError(f"ablate --variants: {unknown[0]!r} is not a variant of this recipe (variants: {', '.join(out)})")
        out = {k: v for k, v in out.items() if k in wanted}
    return out


def _needs(recipe, name: str) -> list[str]:
    """Stages `name` depends on (transitively), in recipe order."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        st = recipe.stages[todo.pop()]
        for attr in ("from_", "data"):
            refs = getattr(st, attr, None)
            for ref in refs if isinstance(refs, list) else [refs]:
                if isinstance(ref, str) and ref in recipe.stages and ref not in seen:
                    seen.add(ref)
                    todo.append(ref)
    return [n for n in recipe.stages if n in seen]


def _rl_stage(recipe, name: str | None) -> str:
    rl = [n for n, s in recipe.stages.items() if s.kind == "rl"]
    if name is not None:
        if name not in rl:
            raise RecipeError(f"ablate --stage {name!r}: not an rl stage of the recipe (rl stages: {', '.join(rl) or 'none'})")
        return name
    if len(rl) != 1:
        raise RecipeError(f"ablate: the recipe has {len(rl)} rl stages ({', '.join(rl) or 'none'}); name one with --stage")
    return rl[0]


def run_ablation(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    *,
    stage: str | None = None,
    steps: int | None = None,
    only: list[str] | None = None,
    console=None,
) -> Path:
    """Run the variants (see the module docstring) -> path of ablation.json."""
    from rich.console import Console

    from vlrl.recipe import apply_overrides, read_recipe_file, validate_recipe
    from vlrl.runner import eval_spec_for, resolve_inputs, run_recipe, stage_output

    console = console or Console()
    path = Path(recipe_path)
    raw = read_recipe_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    recipe = validate_recipe(raw, str(path))
    name = _rl_stage(recipe, stage)
    base = recipe.base_dir()
    variants(copy.deepcopy(raw["stages"][name]), only)  # a bad --variants or a stage without terms fails before any compute
    needs = _needs(recipe, name)
    spec = eval_spec_for(recipe, name)
    if spec is not None and spec.data in recipe.stages and spec.data not in needs:
        needs = [n for n in recipe.stages if n in {*needs, spec.data}]
    if needs:
        console.rule(f"[bold]ablation: the stages the rl stage needs[/] ({', '.join(needs)})")
        run_recipe(recipe, console=console, only=needs)
    inputs = resolve_inputs(recipe, name, base)
    rl_raw = copy.deepcopy(raw["stages"][name])
    rl_raw.pop("kind", None)
    rl_raw.update({"from": str(inputs["from"].resolve()), "data": str(inputs["data"].resolve())})
    if steps is not None:
        rl_raw["steps"] = steps
    top = {k: v for k, v in raw.items() if k not in ("stages", "name", "run_dir")}
    if spec is not None:
        data = stage_output(recipe, spec.data, base) if spec.data in recipe.stages else Path(spec.data)
        top["eval"] = {**spec.model_dump(exclude_none=True), "data": str(Path(data).resolve())}
        rl_raw.pop("eval", None)
    start = recipe.stages[name].from_
    start_dir = base / start if isinstance(start, str) and start in recipe.stages else None
    out_rows, series = [], {}
    for vname, vstage in variants(rl_raw, only).items():
        console.rule(f"[bold]ablation variant {vname}[/]")
        vdir = variant_dir(base, vname)
        vraw = {**top, "name": f"{recipe.name}-ablation-{vname}", "run_dir": str(vdir), "stages": {"rl": vstage}}
        run_recipe(validate_recipe(vraw, f"{path} (ablation variant {vname})"), console=console)
        row, curves = summarize_variant(vname, vdir / "rl")
        if start_dir is not None:
            row.update(paired_cells(start_dir, vdir / "rl", "start"))
        if vname != "plain":
            row.update(paired_cells(variant_dir(base, "plain") / "rl", vdir / "rl", "plain"))
        out_rows.append(row)
        series[vname] = curves
    return write_outputs(base, f"{recipe.name}: hybrid RL ablation ({name}, {rl_raw['steps']} steps)", out_rows, series)


def variant_dir(base: Path, variant: str) -> Path:
    """Where a variant's run of the ablation lives under the recipe's run dir."""
    return base / "ablation" / variant


def paired_cells(base_dir: Path, new_dir: Path, base_name: str) -> dict[str, str]:
    """`<family>_vs_<base_name>`: the new eval's accuracy minus the base's, in points, with
    its 95% interval, paired record by record ("+2.3 [-0.4, +5.0]"): between variants of
    one budget a few points are noise at 1,500 records, and the table should say which
    differences are not. Empty when either eval is missing or they scored other records."""
    from vlrl.eval_diff import diff_reports, load_report
    from vlrl.errors import VlrlError

    try:
        rows = diff_reports(load_report(base_dir), load_report(new_dir))
    except VlrlError:
        return {}
    return {
        f"{r.group}_vs_{base_name}": f"{100 * r.delta:+.1f} [{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}]"
        for r in rows if r.group in PAIRED
    }


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize_variant(name: str, stage_dir: Path) -> tuple[dict, dict[str, list[tuple[int, float | None]]]]:
    """One ablation row from a finished variant: held-out accuracy by family (its closing
    eval), the means of the training metrics over the last half of the steps, train time."""
    from vlrl.tracking import read_metrics

    metrics = read_metrics(stage_dir / "metrics.jsonl")
    steps = [m for m in metrics if "time/step" in m]
    tail = steps[len(steps) // 2 :]
    ev = json.loads((stage_dir / "eval.json").read_text()) if (stage_dir / "eval.json").is_file() else {}
    fam = ev.get("by_family", {})
    row = {
        "variant": name,
        "reasoning_acc": fam.get("reasoning"),
        "perception_acc": fam.get("perception"),
        "eval_acc": ev.get("accuracy"),
        "visual_dependency": _mean([m.get("visual/dependency") for m in tail]),
        "distinct_2": _mean([m.get("diversity/distinct_2") for m in tail]),
        "single_pattern_frac": _mean([m.get("diversity/single_pattern_frac") for m in tail]),
        "response_length": _mean([m.get("response/length_mean") for m in tail]),
        "reward": _mean([m.get("reward/total/mean") for m in tail]),
        "train_seconds": sum(m["time/step"] for m in steps),
    }
    curves = {k: [(int(m["step"]), m.get(k)) for m in steps] for k in PLOTS}
    return row, curves


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "—" if v is None else str(v)


def write_outputs(base: Path, title: str, rows: list[dict], series: dict[str, dict]) -> Path:
    """ablation.json, ablation-<metric>.svg and ablation.md (table + plots) in `base`."""
    from rollout.server.svgplot import line_chart

    base.mkdir(parents=True, exist_ok=True)
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    target = base / "ablation.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"title": title, "columns": COLUMNS, "rows": rows}, indent=2) + "\n")
    tmp.replace(target)
    md = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    md.append("")
    for key, plot_title in PLOTS.items():
        lines = [(v, [x for x, _ in c[key]], [y for _, y in c[key]]) for v, c in series.items() if c.get(key)]
        if not lines:
            continue
        fname = f"ablation-{key.replace('/', '_')}.svg"
        (base / fname).write_text(line_chart(lines, title=plot_title))
        md.append(f"![{plot_title}]({fname})")
    (base / "ablation.md").write_text("\n".join(md) + "\n")
    return target

"""`vlrl report RUN_DIR`: one self-contained HTML file about a run, readable offline.

Per stage (recipe order): what DONE.json says, a small-multiples grid of every numeric
metric in metrics.jsonl (inline SVG, one chart per metric), the rollout store's per-step
reward, component and length curves, an RL stage's held-out curve (one chart, a line per
family), and the eval tables (overall, by family, by task,
family x difficulty). Then every ablation table found (`ablation*.json` in the run folder
or a stage folder: `{"title", "columns", "rows": [{...}]}` or a bare list of row objects).

Nothing is loaded from outside the file: no scripts, fonts or stylesheets.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from rollout.server import curves
from rollout.server.rundir import RunDir
from rollout.server.svgplot import line_chart

MAX_METRIC_PLOTS = 60  # per stage; a stage logging more gets the first 60 (sorted) and a note

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}h3{font-size:15px}
.grid{display:flex;flex-wrap:wrap;gap:10px}.muted{color:#777}
table{border-collapse:collapse;margin:6px 12px 12px 0;display:inline-table;vertical-align:top}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
td.l,th.l{text-align:left}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(v) -> str:
    if isinstance(v, bool) or v is None:
        return _e("—" if v is None else v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


def _table(headers: list[str], rows: list[list], title: str = "") -> str:
    head = "".join(f"<th class='l'>{_e(h)}</th>" if i == 0 else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td class='l'>{_e(c)}</td>" if i == 0 else f"<td>{_num(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    cap = f"<caption>{_e(title)}</caption>" if title else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def eval_tables(ev: dict) -> str:
    parts = [f"<p>accuracy <b>{_num(ev.get('accuracy'))}</b> over n={_e(ev.get('n', '?'))}" + (f" · model <code>{_e(ev['model'])}</code>" if ev.get("model") else "") + "</p>"]
    for key, label in (("by_family", "family"), ("by_task", "task")):
        if isinstance(ev.get(key), dict):
            parts.append(_table([label, "accuracy"], [[k, v] for k, v in ev[key].items()]))
    fams = ev.get("families")
    if isinstance(fams, dict) and fams:
        levels = sorted({lvl for f in fams.values() if isinstance(f, dict) for lvl in f}, key=lambda x: (x == "all", x))
        rows = [[fam, *[(f.get(lvl) or {}).get("accuracy") for lvl in levels]] for fam, f in fams.items() if isinstance(f, dict)]
        parts.append(_table(["family \\ difficulty", *levels], rows))
    return "".join(parts)


def stage_section(run: RunDir, name: str, kind: str | None) -> str:
    out = [f"<h2 id='stage-{_e(name)}'>{_e(name)}" + (f" <span class='muted'>({_e(kind)})</span>" if kind else "") + "</h2>"]
    done = run.done(name)
    if done:
        summary = {k: v for k, v in (done.get("summary") or {}).items() if k != "eval"}
        scalars = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
        nested = {k: v for k, v in summary.items() if k not in scalars}
        out.append(f"<p>finished in {_num(done.get('seconds'))} s" + "".join(f" · {_e(k)} {_num(v)}" for k, v in scalars.items()) + "</p>")
        if nested:
            out.append(f"<details><summary>summary</summary><pre>{_e(json.dumps(nested, indent=1))}</pre></details>")
    else:
        out.append("<p class='muted'>not finished (no DONE.json)</p>")
    rows = run.metrics(name)
    keys = curves.numeric_keys(rows)
    if keys:
        shown = keys[:MAX_METRIC_PLOTS]
        out.append(f"<h3>Curves (metrics.jsonl, {len(rows)} logged steps)</h3><div class='grid'>")
        out.extend(line_chart([(k, *curves.metric_curve(rows, k))], title=k, width=330, height=200) for k in shown)
        out.append("</div>")
        if len(keys) > len(shown):
            out.append(f"<p class='muted'>{len(keys) - len(shown)} more metrics not plotted: {_e(', '.join(keys[len(shown):]))}</p>")
    if (run.stage_dir(name) / "rollouts.sqlite").is_file():
        c = curves.store_curves(run.store(name))
        comps = [k for k in c if k.startswith("rollouts/component/")]
        out.append("<h3>Rollouts</h3><div class='grid'>")
        out.append(line_chart([(k.split("/")[-1], *c[k]) for k in ("rollouts/reward_mean", "rollouts/reward_min", "rollouts/reward_max")], title="reward per step"))
        if comps:
            out.append(line_chart([(k.split("/")[-1], *c[k]) for k in comps], title="component means"))
        out.append(line_chart([("length", *c["rollouts/length_mean"])], title="response length (tokens)"))
        out.append("</div>")
    points = run.heldout_curve(name)
    if points:
        out.append(heldout_section(points))
    ev = run.eval(name)
    if isinstance(ev, dict):
        out.append("<h3>Eval</h3>" + eval_tables(ev))
    return "".join(out)


def heldout_section(points: list[dict]) -> str:
    """The RL stage's greedy held-out curve: one line per family and one for all, and the numbers."""
    families = sorted({f for p in points for f in p["by_family"]})
    steps = [float(p["step"]) for p in points]
    series = [(f, steps, [p["by_family"].get(f) for p in points]) for f in families]
    series.append(("all", steps, [p.get("accuracy") for p in points]))
    n = points[-1].get("n", "?")
    rows = [[p["step"], *[p["by_family"].get(f) for f in families], p.get("accuracy")] for p in points]
    return (
        f"<h3>Held-out curve (greedy, the same {_e(n)} records at every point; curve.jsonl)</h3>"
        + line_chart(series, title="held-out accuracy")
        + _table(["step", *families, "all"], rows)
    )


def build_report(run_dir: str | Path) -> str:
    run = RunDir(run_dir)
    try:
        stages = run.stages()
        body = [f"<h1>Run report: {_e(run.name)}</h1>", f"<p class='muted'>{_e(run.root)} · written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"]
        if stages:
            body.append("<p>stages: " + " → ".join(f"<a href='#stage-{_e(s.name)}'>{_e(s.name)}</a>" for s in stages) + "</p>")
            summary_rows = []
            for s in stages:
                ev = run.eval(s.name) or {}
                done = run.done(s.name) or {}
                summary_rows.append([s.name, s.kind or "", "yes" if s.done else "no", done.get("seconds"), ev.get("accuracy")])
            body.append(_table(["stage", "kind", "done", "seconds", "eval accuracy"], summary_rows))
        else:
            body.append("<p class='muted'>no stage output yet</p>")
        body.extend(stage_section(run, s.name, s.kind) for s in stages)
        ablations = run.ablations()
        if ablations:
            body.append("<h2>Ablations</h2>")
            for path, t in ablations:
                body.append(f"<h3>{_e(t['title'] or path)} <span class='muted'>({_e(path)})</span></h3>")
                body.append(_table(t["columns"], [[r.get(c) for c in t["columns"]] for r in t["rows"]]))
    finally:
        run.close()
    return f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>vlrl report: {_e(run.name)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report (default RUN_DIR/report.html, atomically) -> its path."""
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    text = build_report(run_dir)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out

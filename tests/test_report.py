"""`vlrl report`: one self-contained HTML file with every stage's curves, eval tables and
ablation tables."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

from typer.testing import CliRunner

from rollout.server.demo import write_demo_run
from rollout.server.report import build_report
from vlrl.cli import app


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def make_run(tmp_path):
    run = write_demo_run(tmp_path / "run", steps=5, groups=2, group_size=3)
    recipe = json.loads((run / "recipe.resolved.json").read_text())
    recipe["stages"] = {"sft": {"kind": "sft"}, **recipe["stages"]}
    (run / "recipe.resolved.json").write_text(json.dumps(recipe))
    (run / "sft").mkdir()
    (run / "sft" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 2.0 / (s + 1), "train/lr": 1e-3}) + "\n" for s in range(1, 6)))
    (run / "sft" / "eval.json").write_text(
        json.dumps({"n": 10, "accuracy": 0.3, "by_family": {"perception": 0.25}, "families": {"perception": {"1": {"accuracy": 0.5}, "all": {"accuracy": 0.25}}}})
    )
    (run / "ablation.json").write_text(
        json.dumps({"title": "hybrid terms", "columns": ["variant", "reasoning", "perception"], "rows": [{"variant": "grpo", "reasoning": 0.31, "perception": 0.5}, {"variant": "<all>", "reasoning": 0.35}]})
    )
    (run / "rl" / "ablation-length.json").write_text(json.dumps([{"mode": "short", "length": 12.5}, {"mode": "long", "length": 40}]))
    return run


def test_report_has_curves_eval_and_ablations_and_loads_nothing_external(tmp_path):
    run = make_run(tmp_path)
    html = build_report(run)
    p = _Collect()
    p.feed(html)
    tags = [t for t, _ in p.tags]
    # stages in recipe order, each with its own section
    assert html.index("id='stage-sft'") < html.index("id='stage-rl'")
    # sft: 2 metric charts; rl: 4 metric charts + 3 rollout charts
    assert tags.count("svg") == 2 + 4 + 3
    assert "train/loss" in html and "reward per step" in html and "component means" in html
    assert "0.3" in html and "family \\ difficulty" in html  # eval tables
    assert "hybrid terms" in html and "&lt;all&gt;" in html and "<all>" not in html  # escaped
    assert "ablation-length.json" in html and "short" in html
    # self-contained: no script, stylesheet link, or remote reference
    assert "script" not in tags and "link" not in tags and "img" not in tags
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html)


def test_report_command_writes_the_file_and_rejects_a_missing_folder(tmp_path):
    run = make_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").read_text().startswith("<!doctype html>")
    out = tmp_path / "elsewhere.html"
    assert CliRunner().invoke(app, ["report", str(run), "--out", str(out)]).exit_code == 0 and out.is_file()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert bad.exit_code != 0 and "not a run directory" in str(bad.exception)


def test_report_of_an_empty_run_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no stage output yet" in build_report(tmp_path / "empty")


def test_report_draws_the_heldout_curve_of_an_rl_stage(tmp_path):
    from rlhf.heldout import CurvePoint

    run = make_run(tmp_path)
    points = [
        CurvePoint(step=s, n=500, accuracy=a, by_family={"perception": a - 0.01, "reasoning": a + 0.01}, families={}, seconds=1.0)
        for s, a in ((0, 0.193), (50, 0.201), (100, 0.188))
    ]
    (run / "rl" / "curve.jsonl").write_text("".join(p.to_json() + "\n" for p in points) + '{"step": 150, "acc')  # torn last line
    html = build_report(run)
    section = html[html.index("Held-out curve"):]
    assert "the same 500 records" in section
    p = _Collect()
    p.feed(section[: section.index("</table>")])
    assert [t for t, _ in p.tags].count("svg") == 1
    rows = re.findall(r"<tr><td class='l'>(\d+)</td><td>([\d.]+)</td><td>([\d.]+)</td><td>([\d.]+)</td></tr>", section)
    assert rows == [("0", "0.183", "0.203", "0.193"), ("50", "0.191", "0.211", "0.201"), ("100", "0.178", "0.198", "0.188")]
    assert "Held-out curve" not in html[: html.index("id='stage-rl'")]  # the sft stage has none


def test_chart_axis_labels_tell_their_ticks_apart():
    from rollout.server.svgplot import line_chart

    # a constant learning rate (range padded to 9e-5..1.1e-4) and a counter near 10,000
    for ys in ([1e-4] * 5, [10_000.0, 10_004.0, 10_010.0]):
        svg = line_chart([("y", list(range(len(ys))), ys)], title="t")
        labels = re.findall(r'text-anchor="end" fill="#444">([^<]+)<', svg)
        assert len(labels) >= 3 and len(set(labels)) == len(labels), labels
    # round ticks keep their short labels
    svg = line_chart([("y", [0, 1, 2], [0.0, 0.5, 1.0])])
    assert re.findall(r'text-anchor="end" fill="#444">([^<]+)<', svg) == ["0", "0.25", "0.5", "0.75", "1"]

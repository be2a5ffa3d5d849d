"""Paired comparison of two eval reports on the same held-out records.

Two checkpoints scored on the same records differ only where one is right and the
other wrong, so the paired difference is far tighter than comparing two accuracies
as if they came from independent samples. At the tiny recipe's scale this decides
whether "SFT raised reasoning by a point" is a change or noise: the same checkpoint
scored on two 1,500-record draws moved perception by 2.5 points (docs/sft.md).

Pure functions over the reports' per-record predictions; the CLI renders them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel

from vlrl.errors import VlrlError

Z95 = 1.959963984540054  # two-sided 95% normal quantile


class PairedScore(BaseModel):
    group: str
    n: int
    base_correct: int
    new_correct: int
    new_only: int  # records the new checkpoint gets right and the base gets wrong
    base_only: int  # and the other way round
    delta: float  # new accuracy - base accuracy, as a fraction
    ci_low: float
    ci_high: float
    p_value: float  # exact two-sided McNemar test on the discordant records


def mcnemar_exact_p(new_only: int, base_only: int) -> float:
    """Exact two-sided McNemar p-value: under "no difference" each discordant record is
    a fair coin, so the smaller count is Binomial(new_only + base_only, 1/2)'s tail,
    doubled. Written out (three lines) rather than adding scipy for `binomtest`."""
    m = new_only + base_only
    if m == 0:
        return 1.0
    k = min(new_only, base_only)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_delta_ci(n: int, new_only: int, base_only: int, z: float = Z95) -> tuple[float, float, float]:
    """Difference of paired proportions and its Wald interval:
    d = (b - c) / n, Var(d) = ((b + c) - (b - c)^2 / n) / n^2."""
    if n <= 0:
        raise ValueError("no paired records")
    b, c = new_only, base_only
    d = (b - c) / n
    var = max(0.0, (b + c) - (b - c) ** 2 / n) / n**2
    half = z * math.sqrt(var)
    return d, d - half, d + half


def paired_score(group: str, pairs: list[tuple[bool, bool]]) -> PairedScore:
    """pairs: (base correct, new correct) per record of the group."""
    n = len(pairs)
    new_only = sum(1 for a, b in pairs if b and not a)
    base_only = sum(1 for a, b in pairs if a and not b)
    d, lo, hi = paired_delta_ci(n, new_only, base_only)
    return PairedScore(
        group=group, n=n, base_correct=sum(a for a, _ in pairs), new_correct=sum(b for _, b in pairs),
        new_only=new_only, base_only=base_only, delta=d, ci_low=lo, ci_high=hi,
        p_value=mcnemar_exact_p(new_only, base_only),
    )


def load_report(path: str | Path) -> dict:
    """An eval report: the JSON `vlrl eval --json` writes, or a stage folder holding eval.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise VlrlError(f"{path}: no eval report here (give an eval JSON or a stage folder with eval.json)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VlrlError(f"{path}: not JSON ({e})") from e
    if not isinstance(report, dict) or not isinstance(report.get("predictions"), list):
        raise VlrlError(f"{path}: not an eval report (expected a `predictions` list, as `vlrl eval --json` writes)")
    report["_path"] = str(path)
    return report


def _by_id(report: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i, p in enumerate(report["predictions"]):
        missing = [k for k in ("id", "correct", "family", "task") if k not in p]
        if missing:
            raise VlrlError(f"{report['_path']}: predictions[{i}] lacks {', '.join(missing)}")
        out[p["id"]] = p
    return out


def diff_reports(base: dict, new: dict, by: str = "family") -> list[PairedScore]:
    """One paired score per group (`family` or `task`) and one for all records.
    Refuses reports that were not scored on the same records."""
    if by not in ("family", "task"):
        raise VlrlError(f"--by must be family or task, got {by!r}")
    a, b = _by_id(base), _by_id(new)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise VlrlError(
            f"{base['_path']} and {new['_path']} were not scored on the same records: "
            f"{len(only_a)} ids only in the first (e.g. {only_a[:3]}), {len(only_b)} only in the second (e.g. {only_b[:3]})"
        )
    clash = [i for i in a if a[i].get("answer") != b[i].get("answer") or a[i][by] != b[i][by]]
    if clash:
        raise VlrlError(f"{base['_path']} and {new['_path']}: record {clash[0]!r} has a different answer or {by} in each "
                        f"({len(clash)} such records): not the same eval set")
    groups: dict[str, list[tuple[bool, bool]]] = {}
    for i in sorted(a):
        groups.setdefault(a[i][by], []).append((bool(a[i]["correct"]), bool(b[i]["correct"])))
    every = [pair for name in sorted(groups) for pair in groups[name]]
    return [paired_score(name, groups[name]) for name in sorted(groups)] + [paired_score("all", every)]


def markdown_table(rows: list[PairedScore], by: str = "family") -> str:
    """The paired scores as a Markdown table (what a stage writes beside its eval)."""
    lines = [f"| {by} | n | base % | new % | change (pts) | 95% interval | gained / lost | p (McNemar) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.group} | {r.n} | {100 * r.base_correct / r.n:.1f} | {100 * r.new_correct / r.n:.1f} | "
                     f"{100 * r.delta:+.1f} | [{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}] | "
                     f"{r.new_only} / {r.base_only} | {r.p_value:.3g} |")
    return "\n".join(lines) + "\n"


def steps_markdown(base: dict, new: dict) -> str:
    """The worked-step diagnosis of both reports side by side (docs/metrics.md), for the tasks
    both have: which of reading and arithmetic moved. Empty when either report lacks it (an
    eval from before it existed, or a task world without worked references)."""
    a, b = base.get("steps") or {}, new.get("steps") or {}
    tasks = sorted(set(a) & set(b))
    if not tasks:
        return ""

    def pct(st: dict, key: str) -> float:
        return 100 * st[key] / st["n"] if st["n"] else 0.0

    lines = ["| task | n | values read % (base -> new) | every step holds % | wrong with a slip % | wrong, steps hold % |",
             "|---|---|---|---|---|---|"]
    for t in tasks:
        cells = [f"{pct(a[t], k):.1f} -> {pct(b[t], k):.1f}" for k in ("values_read", "computed", "wrong_slip", "wrong_steps_hold")]
        lines.append(f"| {t} | {b[t]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_with_start(stage_dir: Path, start_dir: Path) -> tuple[list[PairedScore] | None, str]:
    """A training stage's eval against the eval of the stage it started from, when both
    scored the same records: (rows, note). Writes vs_start.json and vs_start.md in
    stage_dir. Never raises for reports that do not pair: the note says why."""
    mine, theirs = stage_dir / "eval.json", start_dir / "eval.json"
    if not (mine.is_file() and theirs.is_file()):
        return None, ""  # the start was not evaluated (a model stage with eval: false)
    try:
        base, new = load_report(theirs), load_report(mine)
        rows = diff_reports(base, new)
    except VlrlError as e:
        return None, f"no paired comparison: {e}"
    (stage_dir / "vs_start.json").write_text(json.dumps({"start": str(start_dir), "rows": [r.model_dump() for r in rows]}, indent=2) + "\n")
    steps = steps_markdown(base, new)
    (stage_dir / "vs_start.md").write_text(
        f"{stage_dir.name} vs its start {start_dir.name}, paired on the same records\n\n" + markdown_table(rows)
        + (f"\nWorked steps, % of responses (read or computed?, docs/metrics.md)\n\n{steps}" if steps else "")
    )
    return rows, f"{stage_dir.name} vs {start_dir.name} (paired): " + ", ".join(
        f"{r.group} {100 * r.delta:+.1f} pts [{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}] p={r.p_value:.2g}" for r in rows if r.group != "all")

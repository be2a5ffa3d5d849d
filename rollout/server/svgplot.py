"""Line charts as standalone SVG text: the report inlines them, the web page shows them
as images, so one drawing routine serves both and nothing is fetched from a CDN.

Every label is XML-escaped (metric names and titles come from files of the run)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]

Series = tuple[str, Sequence[float], Sequence[float | None]]  # (label, xs, ys); None = gap


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float, extra_digits: int = 0) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.{2 + extra_digits}g}"
    return f"{v:.{4 + extra_digits}g}"


def tick_labels(ticks: list[float]) -> list[str]:
    """Short labels, with more digits where the short ones would round two ticks to one
    text (a constant 1e-4 padded to 9e-5..1.1e-4 read 0.00011 twice; ticks near 10,000
    all read 1e+04)."""
    step = min((b - a for a, b in zip(ticks, ticks[1:])), default=0.0)
    for extra in range(12):
        labels = [_fmt(t, extra) for t in ticks]
        if all(abs(float(label) - t) <= step * 1e-6 for label, t in zip(labels, ticks)):
            break
    return labels


def line_chart(series: Sequence[Series], *, title: str = "", xlabel: str = "step", width: int = 420, height: int = 240) -> str:
    """One SVG document with a line per series, axes with round ticks and a legend."""
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and math.isfinite(x)]
    left, right, top, bottom = 52, 12, 24 if title else 10, 34
    legend_h = 14 * len(series) if len(series) > 1 else 0
    h = height + legend_h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}" '
        f'font-family="sans-serif" font-size="11" role="img" aria-label={quoteattr(title or "chart")}>',
        f'<rect width="{width}" height="{h}" fill="white"/>',
    ]
    if title:
        out.append(f'<text x="{width / 2}" y="15" text-anchor="middle" font-weight="bold">{escape(title)}</text>')
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">no data yet</text></svg>')
        return "".join(out)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    yticks = nice_ticks(y0, y1)
    for t, label in zip(yticks, tick_labels(yticks)):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#444">{label}</text>')
    xticks = nice_ticks(x0, x1)
    for t, label in zip(xticks, tick_labels(xticks)):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#444"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle" fill="#444">{label}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 29}" text-anchor="middle" fill="#444">{escape(xlabel)}</text>')
    for i, (label, xs, ys) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        segments, cur = [], []
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y) or not math.isfinite(x):
                if cur:
                    segments.append(cur)
                cur = []
            else:
                cur.append(f"{sx(x):.1f},{sy(y):.1f}")
        if cur:
            segments.append(cur)
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
            else:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{" ".join(seg)}"/>')
        if len(series) > 1:
            ly = height + 14 * i + 4
            out.append(f'<line x1="{left}" x2="{left + 16}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
            out.append(f'<text x="{left + 20}" y="{ly + 4}" fill="#222">{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)

"""Inline SVG charts for the HTML report (engine/report/html.py): a stacked histogram with threshold lines, grouped
horizontal bars, and a scatter plot.

Hand-written SVG rather than matplotlib: the page stays one text file with crisp vector charts whose labels a
browser can search and copy, a chart costs microseconds instead of matplotlib's ~1 s import plus ~50 ms a PNG
figure, and the report needs no plotting dependency at all (the run command writes it at its end, so its cost is
paid by every run). A 3,000-point scatter is about 150 KB of SVG, the size of one PNG of the same plot.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

FONT = "font-family='system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif' font-size='11'"


def fmt(x: float) -> str:
    """Compact number: 12,345 / 0.123 / 1.2e-05 / 3.4M."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    ax = abs(x)
    if ax >= 1e6:
        return f"{x / 1e6:.3g}M"
    if ax >= 1000 or float(x).is_integer():
        return f"{x:,.0f}"
    if ax >= 1:
        return f"{x:.3g}"
    if ax >= 1e-3 or ax == 0:
        return f"{x:.3f}".rstrip("0").rstrip(".") or "0"
    return f"{x:.1e}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten (and 2x, 5x when the range is short) inside [lo, hi] (values, not logs)."""
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1,) if hi / lo > 1e3 else (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                out.append(v)
    return out or [lo, hi]


def histogram(
    edges: np.ndarray,
    stacks: list[tuple[str, np.ndarray, str]],
    lines: list[tuple[float, str]],
    log_x: bool,
    xlabel: str,
    width: int = 560,
    height: int = 250,
) -> str:
    """A stacked histogram: ``edges`` (bins + 1 values, increasing), ``stacks`` (name, counts per bin, colour)
    drawn bottom up, ``lines`` (x value, label) dashed red verticals (thresholds) where they fall inside the axis."""
    ml, mr, mt, mb = 52, 14, 26, 40
    pw, ph = width - ml - mr, height - mt - mb
    lo, hi = float(edges[0]), float(edges[-1])
    tx = (lambda v: math.log10(max(v, 1e-300))) if log_x else (lambda v: v)
    a, b = tx(lo), tx(hi)
    if b <= a:
        b = a + 1

    def X(v):
        return ml + (tx(v) - a) / (b - a) * pw

    total = np.sum([s[1] for s in stacks], axis=0) if stacks else np.zeros(len(edges) - 1)
    ymax = max(float(total.max()) if len(total) else 0.0, 1.0)
    yt = nice_ticks(0, ymax, 4)
    ymax = max(ymax, yt[-1])

    def Y(v):
        return mt + ph - v / ymax * ph

    out = [(f"<svg width='{width}' height='{height}' viewBox='0 0 {width} {height}' {FONT} role='img'>")]
    for t in yt:
        out.append(
            f"<line x1='{ml}' x2='{ml + pw}' y1='{Y(t):.1f}' y2='{Y(t):.1f}' stroke='#e5e5e5'/>"
            f"<text x='{ml - 4}' y='{Y(t) + 4:.1f}' text-anchor='end' fill='#555'>{fmt(t)}</text>"
        )
    base = np.zeros(len(edges) - 1)
    for name, counts, color in stacks:
        for i, c in enumerate(counts):
            if c <= 0:
                continue
            x0, x1 = X(edges[i]), X(edges[i + 1])
            y0, y1 = Y(base[i] + c), Y(base[i])
            out.append(
                f"<rect x='{x0:.1f}' y='{y0:.1f}' width='{max(x1 - x0 - 0.5, 0.5):.1f}' "
                f"height='{max(y1 - y0, 0.5):.1f}' fill='{color}'><title>{escape(name)}: {int(c):,} rows in "
                f"[{fmt(edges[i])}, {fmt(edges[i + 1])})</title></rect>"
            )
        base = base + counts
    xt = _log_ticks(lo, hi) if log_x else nice_ticks(lo, hi, 5)
    out.append(f"<line x1='{ml}' x2='{ml + pw}' y1='{mt + ph}' y2='{mt + ph}' stroke='#333'/>")
    for t in xt:
        if lo - 1e-12 <= t <= hi + 1e-12:
            out.append(
                f"<line x1='{X(t):.1f}' x2='{X(t):.1f}' y1='{mt + ph}' y2='{mt + ph + 4}' stroke='#333'/>"
                f"<text x='{X(t):.1f}' y='{mt + ph + 15}' text-anchor='middle' fill='#333'>{fmt(t)}</text>"
            )
    out.append(
        f"<text x='{ml + pw / 2}' y='{height - 6}' text-anchor='middle' fill='#333'>{escape(xlabel)}</text>"
        f"<text x='12' y='{mt + ph / 2}' text-anchor='middle' fill='#333' "
        f"transform='rotate(-90 12 {mt + ph / 2})'>rows</text>"
    )
    for k, (v, label) in enumerate(lines):
        if not (lo <= v <= hi):
            continue
        x = X(v)
        anchor = "end" if x > ml + pw * 0.6 else "start"
        dx = -3 if anchor == "end" else 3
        out.append(
            f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{mt - 4}' y2='{mt + ph}' stroke='#c0392b' stroke-width='1.5' "
            f"stroke-dasharray='4 3'/><text x='{x + dx:.1f}' y='{mt + 8 + 12 * k}' text-anchor='{anchor}' "
            f"fill='#c0392b'>{escape(label)}</text>"
        )
    # legend, top left above the plot
    x = ml
    for name, _c, color in stacks:
        out.append(
            f"<rect x='{x}' y='6' width='10' height='10' fill='{color}'/>"
            f"<text x='{x + 14}' y='15' fill='#333'>{escape(name)}</text>"
        )
        x += 22 + 6.2 * len(name)
    out.append("</svg>")
    return "".join(out)


def bars(
    labels: list[str],
    series: list[tuple[str, list[float], str]],
    xlabel: str,
    width: int = 560,
    bar: int = 9,
    label_chars: int = 28,
) -> str:
    """Horizontal grouped bars: one group per label, one bar per series (name, values, colour), value printed at
    the bar's end."""
    ml = 8 + 6 * min(label_chars, max((len(s) for s in labels), default=4))
    mr, mt, mb = 56, 22, 30
    group = bar * len(series) + 6
    height = mt + mb + group * len(labels)
    pw = width - ml - mr
    vmax = max([max(v, default=0) for _n, v, _c in series] + [1])
    out = [(f"<svg width='{width}' height='{height}' viewBox='0 0 {width} {height}' {FONT} role='img'>")]
    for gi, lab in enumerate(labels):
        y0 = mt + gi * group
        short = lab if len(lab) <= label_chars else "…" + lab[-(label_chars - 1) :]
        out.append(
            f"<text x='{ml - 6}' y='{y0 + group / 2 + 1:.1f}' text-anchor='end' fill='#333'>"
            f"<title>{escape(lab)}</title>{escape(short)}</text>"
        )
        for si, (name, vals, color) in enumerate(series):
            v = float(vals[gi])
            w = v / vmax * pw
            y = y0 + si * bar
            out.append(
                f"<rect x='{ml}' y='{y}' width='{max(w, 0.5 if v > 0 else 0):.1f}' height='{bar - 1}' "
                f"fill='{color}'><title>{escape(name)}: {fmt(v)}</title></rect>"
                f"<text x='{ml + w + 3:.1f}' y='{y + bar - 1.5}' fill='#555' font-size='9'>{fmt(v)}</text>"
            )
    out.append(
        f"<line x1='{ml}' x2='{ml}' y1='{mt - 4}' y2='{height - mb}' stroke='#333'/>"
        f"<text x='{ml + pw / 2}' y='{height - 8}' text-anchor='middle' fill='#333'>{escape(xlabel)}</text>"
    )
    x = ml
    for name, _v, color in series:
        out.append(
            f"<rect x='{x}' y='4' width='10' height='10' fill='{color}'/>"
            f"<text x='{x + 14}' y='13' fill='#333'>{escape(name)}</text>"
        )
        x += 22 + 6.2 * len(name)
    out.append("</svg>")
    return "".join(out)


def scatter(
    groups: list[tuple[str, np.ndarray, str, float]], xlabel: str, ylabel: str, width: int = 560, height: int = 440
) -> str:
    """Points of each group (name, (n, 2) array, colour, radius), drawn in order (the last on top)."""
    ml, mr, mt, mb = 40, 12, 26, 36
    pw, ph = width - ml - mr, height - mt - mb
    allp = np.concatenate([g[1] for g in groups if len(g[1])]) if any(len(g[1]) for g in groups) else np.zeros((1, 2))
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    lo, hi = lo - 0.03 * span, hi + 0.03 * span
    span = hi - lo
    out = [
        (
            f"<svg width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
            f"{FONT} role='img'><rect x='{ml}' y='{mt}' width='{pw}' height='{ph}' fill='#fafafa' stroke='#ccc'/>"
        )
    ]
    for name, pts, color, r in groups:
        if not len(pts):
            continue
        xs = ml + (pts[:, 0] - lo[0]) / span[0] * pw
        ys = mt + ph - (pts[:, 1] - lo[1]) / span[1] * ph
        circles = "".join(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{r}'/>" for x, y in zip(xs, ys, strict=True))
        out.append(f"<g fill='{color}' fill-opacity='0.75'><title>{escape(name)}</title>{circles}</g>")
    out.append(
        f"<text x='{ml + pw / 2}' y='{height - 10}' text-anchor='middle' fill='#333'>{escape(xlabel)}</text>"
        f"<text x='14' y='{mt + ph / 2}' text-anchor='middle' fill='#333' "
        f"transform='rotate(-90 14 {mt + ph / 2})'>{escape(ylabel)}</text>"
    )
    x = ml
    for name, pts, color, _r in groups:
        label = f"{name} ({len(pts):,})"
        out.append(
            f"<circle cx='{x + 5}' cy='11' r='4' fill='{color}'/>"
            f"<text x='{x + 13}' y='15' fill='#333'>{escape(label)}</text>"
        )
        x += 26 + 6.2 * len(label)
    out.append("</svg>")
    return "".join(out)

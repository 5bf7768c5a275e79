"""Line charts as inline SVG, drawn here: no JavaScript library, nothing fetched by the browser.

A chart is a few series of (time, value) points on one shared time axis; gaps (None) break a
line. Each chart has a ``<title>`` and a text description, so a screen reader announces what it
shows, and the page prints the same figures in a table beside it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

PALETTE = ("#1f5fa8", "#b3461b", "#2b7a3d", "#6b3fa0", "#8a6d00", "#00707a")
WIDTH, HEIGHT = 560, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float | None]]  # (epoch seconds, value or None for a gap)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def _fmt(v: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * v:.1f}%"
    if abs(v) >= 1000:
        return f"{v:,.0f}{unit}"
    return f"{v:.3g}{unit}"


def line_chart(title: str, series: Sequence[Series], unit: str = "", floor_zero: bool = True) -> str:
    """An SVG line chart of ``series`` (markup, already escaped); a note when there is no data."""
    values = [v for s in series for _, v in s.points if v is not None]
    times = [t for s in series for t, v in s.points if v is not None]
    label = escape(title)
    if not values:
        return f'<p class="nodata">{label}: no data in this window.</p>'
    t0, t1 = min(times), max(times)
    if t1 == t0:
        t1 = t0 + 1
    v0 = 0.0 if floor_zero else min(values)
    v1 = max(values)
    if v1 == v0:
        v1 = v0 + (abs(v0) or 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - t0) / (t1 - t0) * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - (v - v0) / (v1 - v0) * plot_h

    cid = "chart-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="{cid}">',
        f'<title id="{cid}">{label}</title>',
    ]
    for v in _ticks(v0, v1):
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{escape(_fmt(v, unit))}</text>'
        )
    for t in (t0, t1):
        stamp = datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S" if t1 - t0 < 600 else "%H:%M")
        anchor = "start" if t == t0 else "end"
        parts.append(f'<text x="{x(t):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">{stamp}</text>')
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        path: list[str] = []
        pen_up = True
        for t, value in s.points:
            if value is None:
                pen_up = True
                continue
            path.append(f"{'M' if pen_up else 'L'}{x(t):.1f},{y(value):.1f}")
            pen_up = False
        if path:
            parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        # a dot on every value: a lone bucket between gaps shows too
        parts += [
            f'<circle cx="{x(t):.1f}" cy="{y(value):.1f}" r="2.5" fill="{colour}"/>'
            for t, value in s.points
            if value is not None
        ]
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch" style="background:{PALETTE[i % len(PALETTE)]}"></span>'
        f"{escape(s.name)}</li>"
        for i, s in enumerate(series)
    )
    return (
        f'<figure class="chart-box"><figcaption>{label}</figcaption>{"".join(parts)}'
        f'<ul class="legend">{legend}</ul></figure>'
    )


__all__ = ["Series", "line_chart"]

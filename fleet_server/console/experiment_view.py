"""An experiment's page: the effect of every arm against the control with its always-valid
interval, drawn as inline SVG (one row per arm and metric: the interval as a bar, the estimate
as a dot, 0 as a line), beside a table of the same figures for screen readers and copying."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from fleet_server.experiment_schemas import ExperimentOut

WIDTH, ROW, LEFT, RIGHT, TOP = 560, 26, 170, 16, 18
BETTER, WORSE, OPEN = "#2b7a3d", "#b3461b", "#1f5fa8"


def interval_chart(
    rows: Sequence[tuple[str, float, float, float, str]], unit: str = "", key: str = "effects"
) -> str:
    """``rows``: (label, estimate, lower, upper, verdict); SVG markup (escaped), one axis for all.
    ``key``: unique on the page (the ids of the chart's title and description)."""
    if not rows:
        return '<p class="nodata">No effect can be estimated yet: an arm or the control has no data.</p>'
    lo = min(min(r[2] for r in rows), 0.0)
    hi = max(max(r[3] for r in rows), 0.0)
    if hi == lo:
        hi = lo + 1.0
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    plot_w = WIDTH - LEFT - RIGHT
    height = TOP + ROW * len(rows) + 22

    def x(v: float) -> float:
        return LEFT + (v - lo) / (hi - lo) * plot_w

    parts = [
        f'<svg class="chart intervals" role="img" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}"'
        f' height="{height}" aria-labelledby="{key}-title {key}-desc">',
        f'<title id="{key}-title">Effect of each arm against the control</title>',
        f'<desc id="{key}-desc">Always-valid intervals: a bar wholly right or left of the zero line is a'
        " proven difference; the table below lists the same figures.</desc>",
        f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{TOP - 6}" y2="{height - 20}" stroke="#555"'
        ' stroke-dasharray="3 3"/>',
        f'<text x="{x(0):.1f}" y="{height - 6}" text-anchor="middle" font-size="11">0</text>',
    ]
    for end, anchor in ((lo, "start"), (hi, "end")):
        if abs(x(end) - x(0)) > 60:  # an end label next to the zero label would overprint it
            parts.append(
                f'<text x="{x(end):.1f}" y="{height - 6}" text-anchor="{anchor}" font-size="11">'
                f"{escape(_fmt(end, unit))}</text>"
            )
    for i, (label, est, low, high, verdict) in enumerate(rows):
        y = TOP + ROW * i + ROW / 2
        color = BETTER if verdict == "better" else WORSE if verdict == "worse" else OPEN
        tip = f"{label}: {_fmt(est, unit)} ({_fmt(low, unit)} .. {_fmt(high, unit)}), {verdict}"
        parts += [
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" font-size="12">{escape(label)}</text>',
            f'<line x1="{x(low):.1f}" x2="{x(high):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}"'
            ' stroke-width="6" stroke-linecap="round" opacity="0.55"/>',
            f'<circle cx="{x(est):.1f}" cy="{y:.1f}" r="4.5" fill="{color}">'
            f"<title>{escape(tip)}</title></circle>",
        ]
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: float, unit: str) -> str:
    return f"{v:+.3g}{unit}"


def context(exp: ExperimentOut) -> dict[str, Any]:
    """What the template shows: the arms, the effects table and one chart per metric."""
    by_metric: dict[str, list[tuple[str, float, float, float, str]]] = {}
    effects = []
    for arm in exp.arms:
        for e in arm.effects:
            effects.append((arm.name, e))
            if e.estimate is not None and e.lower is not None and e.upper is not None:
                by_metric.setdefault(e.metric, []).append((arm.name, e.estimate, e.lower, e.upper, e.verdict))
    order = [exp.metric, *sorted(m for m in by_metric if m != exp.metric)]
    charts = [
        (m, interval_chart(by_metric[m], key=f"effects-{i}")) for i, m in enumerate(order) if m in by_metric
    ]
    metrics = sorted({k for a in exp.arms for k in a.metrics})
    return {"e": exp, "effects": effects, "charts": charts, "metrics": metrics}


__all__ = ["context", "interval_chart"]

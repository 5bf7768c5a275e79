"""A self-contained HTML page of a compile report: tables, and an inline-SVG error plot per float output.

No JavaScript, no external assets and no plotting library: the page is
archived with the bundle and opened years later, offline. The plot is the
distribution of int8 - fp32 per output element (relative to the fp32
output's range), drawn from the histogram ``compiler.evaluate`` stores in the
report, so the page shows exactly what was signed. Its count axis is
logarithmic: almost every element sits in the bins around zero, and the few
large errors in the tails are what a reader needs to see.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from compiler.report_tables import Table, fmt, tables

# The histogram's geometry (px): plot area inside margins that hold the axes' ticks and titles.
WIDTH, HEIGHT = 560, 230
LEFT, RIGHT, TOP, BOTTOM = 62, 30, 10, 48
FLOOR = 0.5  # the log axis starts below one element, so a bin of a single element has a visible bar
esc = html.escape


def _cell(value: Any) -> str:
    """HTML for one value: a nested table for a mapping, a list for strings, text otherwise."""
    if isinstance(value, dict) and value:
        rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, list | tuple) and value and not all(isinstance(v, int | float) for v in value):
        return "<ul>" + "".join(f"<li>{_cell(v)}</li>" for v in value) + "</ul>"
    return esc(fmt(value))


def _table(table: Table) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in table.head)
    trs = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in table.rows)
    cap = f'<p class="caption">{esc(table.caption)}</p>' if table.caption else ""
    return f'<h2>{esc(table.title)}</h2><table class="{esc(table.key)}"><tr>{th}</tr>{trs}</table>{cap}'


def _log_y(count: float, top: float) -> float:
    """The y pixel of ``count`` on the log axis from FLOOR (bottom) to ``top``."""
    plot_h = HEIGHT - TOP - BOTTOM
    frac = (math.log10(max(count, FLOOR)) - math.log10(FLOOR)) / (math.log10(top) - math.log10(FLOOR))
    return TOP + plot_h * (1 - frac)


def svg_histogram(hist: dict[str, Any] | None) -> str:
    """Bars on a log count axis, with ticks and titles on both axes; a tooltip gives each bin exactly."""
    if not hist or not hist.get("counts"):
        return "<p><em>no finite error distribution</em></p>"
    counts: list[int] = hist["counts"]
    edges: list[float] = hist["edges"]
    top = 10.0 ** max(1, math.ceil(math.log10(max(max(counts), 1) * 1.5)))
    plot_w = WIDTH - LEFT - RIGHT
    x0, x1 = edges[0], edges[-1]

    def x_px(value: float) -> float:
        return LEFT + plot_w * (value - x0) / ((x1 - x0) or 1.0)

    base = HEIGHT - BOTTOM
    out: list[str] = []
    decade = 1.0
    while decade <= top:  # horizontal grid and labels at every power of ten
        y = _log_y(decade, top)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        out.append(
            f'<text x="{LEFT - 5}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end">{decade:g}</text>'
        )
        decade *= 10
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        left, right, y = x_px(edges[i]), x_px(edges[i + 1]), _log_y(c, top)
        out.append(
            f'<rect x="{left + 0.5:.1f}" y="{y:.1f}" width="{max(right - left - 1, 1):.1f}" '
            f'height="{base - y:.1f}" fill="#4a7bb7"><title>[{edges[i]:.4g}, {edges[i + 1]:.4g}): '
            f"{c} element(s)</title></rect>"
        )
    out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}" stroke="#333"/>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{base}" stroke="#333"/>')
    for value in (x0, x0 / 2, 0.0, x1 / 2, x1):
        x = x_px(value)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" stroke="#333"/>')
        out.append(
            f'<text x="{x:.1f}" y="{base + 15}" font-size="10" text-anchor="middle">{value:.3g}</text>'
        )
    out.append(
        f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 6}" font-size="11" text-anchor="middle">'
        "int8 - fp32 per element, as a fraction of the fp32 output range</text>"
    )
    mid = TOP + (base - TOP) / 2
    out.append(
        f'<text x="13" y="{mid:.0f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 13 {mid:.0f})">elements (log scale)</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="error histogram, log count axis">{"".join(out)}</svg>'
    )


def _histograms(outputs: dict[str, dict[str, Any]]) -> str:
    return "".join(
        f"<h3>{esc(name)}: error distribution</h3>" + svg_histogram(fig.get("error_histogram"))
        for name, fig in outputs.items()
        if fig.get("kind") != "integer"  # labels are equal or not: no error distribution to draw
    )


def render(report: dict[str, Any], title: str) -> str:
    gate = report.get("gate")
    verdict = gate.get("verdict", "?") if isinstance(gate, dict) else str(gate)
    parts = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="{esc(verdict)}">gate: <strong>{esc(verdict)}</strong></p>',
    ]
    if isinstance(gate, dict) and gate.get("failures"):
        parts.append("<ul>" + "".join(f"<li>{esc(f)}</li>" for f in gate["failures"]) + "</ul>")
    for table in tables(report):
        if table.key == "gate":
            continue  # the verdict and failures head the page
        parts.append(_table(table))
        if table.key == "outputs":
            parts.append(_histograms(report.get("outputs", {})))
    style = (
        "body{font-family:sans-serif;max-width:62em;margin:2em auto}"
        "table{border-collapse:collapse;margin:.5em 0}"
        "th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:13px;vertical-align:top}"
        "td table{margin:0}.caption{font-size:12px;color:#555;margin:0 0 .5em}"
        "ul{margin:0;padding-left:1.2em}.passed{color:#060}.failed{color:#a00}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


REPORT_FILE = "report.html"
"""The report's name inside a bundle (signed, listed after the model and the golden set)."""


def write_html_report(path: Path, report: dict[str, Any], title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report, title), encoding="utf-8")
    return path

"""A self-contained HTML page of a compile report: tables and an inline-SVG error plot per output.

No JavaScript, no external assets and no plotting library: the page is
archived with the bundle and opened years later, offline. The plot is the
distribution of int8 - fp32 per output element (relative to the fp32
output's range), drawn from the histogram ``compiler.evaluate`` stores in the
report, so the page shows exactly what was signed.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 420, 140


def _svg_histogram(hist: dict[str, Any] | None) -> str:
    if not hist or not hist.get("counts"):
        return "<p><em>no finite error distribution</em></p>"
    counts, edges = hist["counts"], hist["edges"]
    peak = max(max(counts), 1)
    bar_w = WIDTH / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (HEIGHT - 20) * c / peak
        bars.append(
            f'<rect x="{i * bar_w:.1f}" y="{HEIGHT - 20 - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
            f'fill="#4a7bb7"><title>[{edges[i]:.4g}, {edges[i + 1]:.4g}): {c}</title></rect>'
        )
    axis = (
        f'<text x="0" y="{HEIGHT - 4}" font-size="10">{edges[0]:.3g}</text>'
        f'<text x="{WIDTH / 2 - 4:.0f}" y="{HEIGHT - 4}" font-size="10">0</text>'
        f'<text x="{WIDTH - 40}" y="{HEIGHT - 4}" font-size="10">{edges[-1]:.3g}</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="error histogram">{"".join(bars)}{axis}</svg>'
    )


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def render(report: dict[str, Any], title: str) -> str:
    gate = report.get("gate")
    verdict = gate.get("verdict", "?") if isinstance(gate, dict) else str(gate)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="{html.escape(verdict)}">gate: <strong>{html.escape(verdict)}</strong></p>',
    ]
    if isinstance(gate, dict) and gate.get("failures"):
        parts.append("<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in gate["failures"]) + "</ul>")
    size = report.get("size", {})
    parts.append("<h2>Size</h2>" + _table([(k, v) for k, v in size.items() if k != "parts"]))
    split = size.get("parts")
    if isinstance(split, dict):
        rows = [(f"{which} {k}", v) for which in ("fp32", "int8") for k, v in split.get(which, {}).items()]
        rows.append(("int8 data only / fp32 (the floor of any table rewrite)", split.get("data_ratio")))
        parts.append("<h3>Where the bytes go</h3>" + _table(rows))
    if report.get("accuracy"):
        parts.append("<h2>Accuracy</h2>" + _table(list(report["accuracy"].items())))
    parts.append("<h2>Outputs (int8 vs fp32, held-out samples)</h2>")
    for name, fig in report.get("outputs", {}).items():
        rows = [(k, v) for k, v in fig.items() if k != "error_histogram"]
        parts.append(
            f"<h3>{html.escape(name)}</h3>{_table(rows)}"
            "<p>error distribution (int8 - fp32, / fp32 range)</p>"
            + _svg_histogram(fig.get("error_histogram"))
        )
    if report.get("latency"):
        lat = report["latency"]
        parts.append(
            "<h2>Host latency (median, batch 1)</h2>"
            + _table([(k, v) for k, v in lat.items() if k.startswith("threads_")])
        )
    if report.get("npu"):
        parts.append("<h2>NPU (Vela)</h2>" + _table(list(report["npu"]["vela"].items())))
        parts.append(_table(list(report["npu"]["budgets"].items())))
    if report.get("ops"):
        parts.append("<h2>Ops</h2>" + _table(list(report["ops"].items())))
    parts.append("<h2>Method</h2>" + _table(list(report.get("method", {}).items())))
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:13px}"
        ".passed{color:#060}.failed{color:#a00}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_html_report(path: Path, report: dict[str, Any], title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report, title), encoding="utf-8")
    return path

"""Write a run's report: timeline plot (PNG + HTML with the plot inline), summary tables (Markdown + JSON).

The tables (checks, figures, events) hold readable text (``simulator.readable``: ``rpi4=18,
jetson=6``, never ``{'rpi4': 18}``); ``summary.json`` keeps the figures as data.

matplotlib with the Agg backend (no display needed); it is imported here
only, so running agents never loads it.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulator.readable import readable
from simulator.runner import CheckResult, RunResult
from simulator.timeline import Timeline, figure


def summary_rows(result: RunResult) -> list[tuple[str, str, str]]:
    """One (outcome, expectation, detail) row per check."""

    def detail(c: CheckResult) -> str:
        if c.skipped is not None:
            return f"skipped: {c.skipped}"
        return c.detail + (f" (known gap: {c.expected_failure})" if c.expected_failure else "")

    return [(c.outcome, c.label, detail(c)) for c in result.checks]


def figure_rows(figures: dict[str, Any]) -> list[tuple[str, str]]:
    """One (figure, value) row per figure, the value as readable text."""
    return [(name, readable(value)) for name, value in figures.items()]


def event_rows(result: RunResult) -> list[tuple[str, str]]:
    return [(f"{t:.2f}", what) for t, what in result.events]


def markdown_table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    """A Markdown table; a ``|`` in a cell is escaped so it cannot split the row."""

    def row(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [row(head), "|" + "---|" * len(head)] + [row(r) for r in rows]


def write_report(result: RunResult, timeline: Timeline | None, out_dir: Path) -> dict[str, Path]:
    """Write ``timeline.png``, ``report.html``, ``summary.md`` and ``summary.json`` into ``out_dir``."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "png": out_dir / "timeline.png",
        "html": out_dir / "report.html",
        "md": out_dir / "summary.md",
        "json": out_dir / "summary.json",
    }
    svg = ""
    if timeline is not None and timeline.samples:
        fig = figure(timeline, f"scenario {result.scenario}")
        fig.savefig(paths["png"], dpi=110)
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        svg = buf.getvalue()
        plt.close(fig)
    rows = summary_rows(result)
    verdict = "PASSED" if result.ok else "FAILED"
    md = [f"# scenario {result.scenario}: {verdict}", ""]
    if result.step_error:
        md += [f"**script stopped:** {result.step_error}", ""]
    md += [f"**skipped:** {why}" for why in result.skipped] + ([""] if result.skipped else [])
    md += markdown_table(("outcome", "expectation", "detail"), rows)
    md += ["", *markdown_table(("figure", "value"), figure_rows(result.figures))]
    md += ["", *markdown_table(("t (s)", "event"), event_rows(result))]
    paths["md"].write_text("\n".join(md) + "\n", encoding="utf-8")
    paths["json"].write_text(
        json.dumps(
            {
                "scenario": result.scenario,
                "ok": result.ok,
                "step_error": result.step_error,
                "skipped": result.skipped,
                "checks": [{"outcome": o, "expectation": label, "detail": d} for o, label, d in rows],
                "figures": result.figures,
                "events": result.events,
            },
            indent=2,
            default=str,
        ),
        encoding="utf-8",
    )
    esc = html.escape

    def table(head: list[str], body: Sequence[tuple[str, ...]]) -> str:
        th = "".join(f"<th>{esc(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><tr>{th}</tr>{trs}</table>"

    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgefleet sim: {esc(result.scenario)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}</style></head><body>
<h1>scenario {esc(result.scenario)}: {verdict}</h1>
{f"<p><b>script stopped:</b> {esc(result.step_error)}</p>" if result.step_error else ""}
{"".join(f"<p><b>skipped:</b> {esc(why)}</p>" for why in result.skipped)}
{table(["outcome", "expectation", "detail"], rows)}
<h2>timeline</h2>{svg or "<p>(no samples)</p>"}
<h2>figures</h2>{table(["figure", "value"], figure_rows(result.figures))}
<h2>events</h2>{table(["t (s)", "event"], event_rows(result))}
</body></html>
"""
    paths["html"].write_text(page, encoding="utf-8")
    if not svg:
        paths.pop("png")
    return paths


__all__ = ["event_rows", "figure_rows", "markdown_table", "summary_rows", "write_report"]

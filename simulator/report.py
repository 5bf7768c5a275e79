"""Write a run's report: timeline plot (PNG + HTML with the plot inline), summary table (Markdown + JSON).

matplotlib with the Agg backend (no display needed); it is imported here
only, so running agents never loads it.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from simulator.runner import CheckResult, RunResult
from simulator.timeline import Timeline

AGENT_ORDER = [
    "serving",
    "idle",
    "downloading",
    "verifying",
    "installing",
    "warming",
    "swapping",
    "failed",
    "rejected",
    "disconnected",
    "down",
]
ROLLOUT_ORDER = ["notified", "installing", "done", "failed", "timed_out", "rolled_back"]
COLOURS = {
    "serving": "#2e7d32",
    "done": "#2e7d32",
    "idle": "#9e9e9e",
    "notified": "#90caf9",
    "downloading": "#42a5f5",
    "verifying": "#7e57c2",
    "installing": "#5c6bc0",
    "warming": "#ffb300",
    "swapping": "#fb8c00",
    "failed": "#c62828",
    "rejected": "#ad1457",
    "timed_out": "#6d4c41",
    "rolled_back": "#ef6c00",
    "disconnected": "#bdbdbd",
    "down": "#212121",
}


def _order(seen: set[str], preferred: list[str]) -> list[str]:
    return [s for s in preferred if s in seen] + sorted(seen - set(preferred))


def _figure(timeline: Timeline, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = timeline.samples
    panels: list[tuple[str, str, int | None]] = [("fleet", "agents (all devices)", None)]
    for key in timeline.stage_of:
        stages = sorted({st for s in samples for st in s.rollouts.get(key, {}).get("per_stage", {})})
        panels += [("rollout", f"rollout {key}: stage {st}", st) for st in stages]
    keys = [p for p in panels]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 2.2 + 1.9 * len(keys)), sharex=True, squeeze=False)
    ts = [s.t for s in samples]
    for ax, (kind, label, stage) in zip(axes[:, 0], keys, strict=True):
        if kind == "fleet":
            seen = {k for s in samples for k in s.agents}
            order = _order(seen, AGENT_ORDER)
            series = [[s.agents.get(k, 0) for s in samples] for k in order]
        else:
            rkey = label.split(":")[0].removeprefix("rollout ")
            rows = [s.rollouts.get(rkey, {}).get("per_stage", {}).get(stage, {}) for s in samples]
            seen = {k for r in rows for k in r}
            order = _order(seen, ROLLOUT_ORDER)
            series = [[r.get(k, 0) for r in rows] for k in order]
        if ts and order:
            ax.stackplot(
                ts, series, labels=order, colors=[COLOURS.get(k, "#607d8b") for k in order], step="post"
            )
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_ylabel("devices", fontsize=8)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
        for t, _what in timeline.marks:
            ax.axvline(t, color="black", lw=0.5, alpha=0.4)
    top = axes[0, 0]
    ymax = top.get_ylim()[1]
    for t, what in timeline.marks:
        top.text(t, ymax, what, rotation=90, fontsize=6, va="top", ha="right", alpha=0.8)
    axes[-1, 0].set_xlabel("seconds since start")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def summary_rows(result: RunResult) -> list[tuple[str, str, str]]:
    def detail(c: CheckResult) -> str:
        if c.skipped is not None:
            return f"skipped: {c.skipped}"
        return c.detail + (f" [known gap: {c.expected_failure}]" if c.expected_failure else "")

    return [(c.outcome, c.label, detail(c)) for c in result.checks]


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
        fig = _figure(timeline, f"scenario {result.scenario}")
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
    md += ["| outcome | expectation | detail |", "|---|---|---|"]
    md += [f"| {o} | {label} | {d} |" for o, label, d in rows]
    md += ["", "| figure | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in result.figures.items()]
    md += ["", "| t (s) | event |", "|---|---|"] + [f"| {t} | {w} |" for t, w in result.events]
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

    def table(head: list[str], body: list[tuple[Any, ...]]) -> str:
        th = "".join(f"<th>{esc(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in body)
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
<h2>figures</h2>{table(["figure", "value"], list(result.figures.items()))}
<h2>events</h2>{table(["t (s)", "event"], result.events)}
</body></html>
"""
    paths["html"].write_text(page, encoding="utf-8")
    if not svg:
        paths.pop("png")
    return paths


__all__ = ["summary_rows", "write_report"]

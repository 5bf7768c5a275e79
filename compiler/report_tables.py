"""A compile report as titled tables: one reading of the report for every place that shows it.

The HTML page (``compiler.html_report``) and the terminal summary of
``edgefleet compile`` render these same tables, so both show the same
figures under the same names. Cells hold plain values (numbers, strings,
None); a nested value (a mapping or list in the method section) stays as it
is and each renderer lays it out (nested table in HTML, ``key: value`` lines
on a terminal), never as cut JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Table:
    key: str  # a stable id: outputs, accuracy, size, bytes, latency, evaluation_latency, ops, npu, ...
    title: str
    head: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    caption: str = ""


def fmt(value: Any) -> str:
    """Short text for one value; mappings and lists become ``key: value`` lines."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "\n".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return ", ".join(fmt(v) for v in value) or "-"
        return "\n".join(fmt(v) for v in value) or "-"
    return str(value)


def _shape(shape: Any) -> str:
    """Per-sample shape: ``10``, ``3x48x192``; ``scalar`` for one value per sample (a label)."""
    return "x".join(str(d) for d in shape) if shape else "scalar"


def outputs(report: dict[str, Any]) -> Table:
    """One row per model output. Integer outputs have exact agreement only (see compiler.evaluate)."""
    rows: list[list[Any]] = []
    for name, fig in report.get("outputs", {}).items():
        if fig.get("kind") == "integer":
            rows.append(
                [name, "integer", _shape(fig.get("shape")), fig.get("exact_agreement"), *["n/a"] * 3, "-"]
            )
            continue
        kind = "scores" if "top1_agreement" in fig else "float"
        nonfinite = f"{fig.get('nonfinite_fp32', 0)} / {fig.get('nonfinite_int8', 0)}"
        agree = fig.get("top1_agreement") if kind == "scores" else "n/a"
        cosine = [fig.get("cosine_mean"), fig.get("cosine_min")]
        rows.append([name, kind, _shape(fig.get("shape")), agree, *cosine, fig.get("snr_db"), nonfinite])
    head = ["output", "kind", "shape", "agreement", "cosine mean", "cosine min", "SNR dB", "non-finite"]
    caption = (
        f"{report.get('evaluation_samples', '?')} held-out samples. Agreement: top-1 for class scores; "
        "for integer outputs (labels) the share of samples whose output is unchanged, which have no "
        "cosine or SNR. Non-finite: fp32 / int8 values."
    )
    return Table("outputs", "int8 vs fp32", head, rows, caption)


def accuracy(report: dict[str, Any]) -> Table | None:
    acc = report.get("accuracy")
    if not acc:
        return None
    row = [acc.get("output"), acc.get("fp32"), acc.get("int8"), acc.get("drop")]
    return Table("accuracy", "accuracy on held-out labels", ["output", "fp32", "int8", "drop"], [row])


def size(report: dict[str, Any]) -> list[Table]:
    sz = report.get("size") or {}
    files = [
        ["float model", sz.get("fp32_bytes"), None],
        ["int8 model", sz.get("int8_bytes"), sz.get("ratio")],
    ]
    if "source_bytes" in sz:
        files.insert(0, ["source file", sz["source_bytes"], None])
    if "artifact_bytes" in sz:
        files.append(["shipped artifact", sz["artifact_bytes"], sz.get("artifact_ratio")])
    out = [Table("size", "size", ["file", "bytes", "/ float"], files)]
    split = sz.get("parts")
    if isinstance(split, dict):
        cols = ["total", "constants", "quantization", "structure"]
        rows = [[which, *(split.get(which, {}).get(c) for c in cols)] for which in ("fp32", "int8")]
        caption = f"int8 numbers alone: {fmt(split.get('data_ratio'))} of fp32 (no table rewrite goes below)"
        out.append(Table("bytes", "where the bytes go", ["file", *cols], rows, caption))
    return out


def latency(report: dict[str, Any]) -> list[Table]:
    out: list[Table] = []
    lat = report.get("latency") or {}
    rows = [
        [k.removeprefix("threads_"), v.get("fp32_ms"), v.get("int8_ms"), v.get("ratio")]
        for k, v in lat.items()
        if k.startswith("threads_") and isinstance(v, dict)
    ]
    if rows:
        caption = f"median of {lat.get('repeats', '?')} runs; {lat.get('note', '')}".rstrip("; ")
        out.append(
            Table("latency", "host latency", ["threads", "fp32 ms", "int8 ms", "int8 / fp32"], rows, caption)
        )
    during = report.get("latency_ms_per_batch")
    if isinstance(during, dict):
        out.append(
            Table(
                "evaluation_latency",
                "time per batch during evaluation",
                ["fp32 ms", "int8 ms"],
                [[during.get("fp32"), during.get("int8")]],
                str(during.get("note", "")),
            )
        )
    return out


def ops(report: dict[str, Any]) -> Table | None:
    """Op types of the float model (and of the int8 TFLite file), and whether the target runs them."""
    found = report.get("ops")
    if not found:
        return None
    float_ops: dict[str, int] = found.get("ops") or {}
    int8_ops: dict[str, int] | None = found.get("int8")
    unsupported: dict[str, str] = found.get("unsupported") or {}
    names = sorted(set(float_ops) | set(int8_ops or {}), key=lambda op: (-float_ops.get(op, 0), op))
    head = ["op", "float model", *(["int8 model"] if int8_ops is not None else []), "target"]
    in_int8 = (lambda op: [int8_ops.get(op, 0)]) if int8_ops is not None else (lambda op: [])
    rows = [[op, float_ops.get(op, 0), *in_int8(op), unsupported.get(op, "supported")] for op in names]
    return Table("ops", "ops", head, rows)


def npu(report: dict[str, Any]) -> list[Table]:
    found = report.get("npu")
    if not found:
        return []
    vela = list((found.get("vela") or {}).items())
    budgets = list((found.get("budgets") or {}).items())
    return [
        Table("npu", "NPU (Vela)", ["figure", "value"], [list(r) for r in vela]),
        Table("budgets", "NPU budgets", ["budget", "value"], [list(r) for r in budgets]),
    ]


def method(report: dict[str, Any]) -> list[Table]:
    """How it was quantized; the calibration candidates (when there were several) as their own table."""
    rows: list[list[Any]] = []
    out: list[Table] = []
    for key, value in (report.get("method") or {}).items():
        figures = (
            value.get("figures") if key == "calibration_candidates" and isinstance(value, dict) else None
        )
        if isinstance(figures, dict):
            cand = [[name, *(f if isinstance(f, list) else [f])] for name, f in figures.items()]
            caption = f"chosen by {value.get('chosen_by', '?')}"
            head = ["candidate", "min SNR dB", "min top-1 agreement"]
            out.append(Table("calibration", "calibration candidates", head, cand, caption))
            continue
        rows.append([key, value])
    return [Table("method", "method", ["setting", "value"], rows), *out]


def gate(report: dict[str, Any]) -> Table:
    g = report.get("gate")
    if not isinstance(g, dict):
        return Table(
            "gate", "gate", ["verdict"], [[str(g)]], "the bundle was written without the quality gate"
        )
    limits = {k: v for k, v in (g.get("thresholds") or {}).items() if v is not None}
    return Table(
        "gate",
        "gate",
        ["verdict", "thresholds"],
        [[g.get("verdict"), limits]],
        "\n".join(g.get("failures") or []),
    )


def notes(report: dict[str, Any]) -> Table | None:
    """What the toolchain (onnxruntime, LiteRT, absl, Python warnings) said while compiling."""
    found = report.get("notes")
    if not found:
        return None
    rows = [[n.get("level"), n.get("source"), n.get("message"), n.get("count")] for n in found]
    caption = "collected during the compile instead of printed (compiler.toolchain_notes)"
    return Table("notes", "toolchain messages", ["level", "from", "message", "count"], rows, caption)


SHOWN = {
    "notes",
    "gate",
    "size",
    "accuracy",
    "outputs",
    "latency",
    "latency_ms_per_batch",
    "npu",
    "ops",
    "method",
    "evaluation_samples",
}


def run(report: dict[str, Any]) -> Table:
    """Everything else in the report (target, sample counts, time), one row each."""
    rows = [[k, v] for k, v in report.items() if k not in SHOWN]
    return Table("run", "run", ["figure", "value"], rows)


def tables(report: dict[str, Any]) -> list[Table]:
    """Every table of the report, in reading order."""
    found = [
        gate(report),
        outputs(report),
        accuracy(report),
        *size(report),
        *latency(report),
        *npu(report),
        ops(report),
        *method(report),
        notes(report),
        run(report),
    ]
    return [t for t in found if t is not None]


__all__ = ["Table", "fmt", "tables"]

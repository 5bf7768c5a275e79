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


TASK_FIGURES: dict[str, tuple[tuple[str, str], ...]] = {
    "integer": (("exact_agreement", "exact"),),
    "classification": (("top1_agreement", "top-1"),),
    "detection": (("box_f1", "box F1"), ("box_iou_mean", "IoU"), ("score_agreement", "scores")),
    "segmentation": (("mask_iou_mean", "mask IoU"), ("mask_iou_min", "min")),
    "sequence": (("step_error", "error"),),
}


def _task_figure(fig: dict[str, Any]) -> str:
    """The kind's own figures in one cell: ``top-1 0.995``, ``box F1 0.97 IoU 0.91``, ``error@50 0.08``."""
    kind = fig.get("kind", "")
    parts = []
    for key, label in TASK_FIGURES.get(kind, ()):
        if key == "step_error":
            label = f"error@{fig.get('step', '?')}"
        parts.append(f"{label} {fmt(fig.get(key))}")
    return " ".join(parts) or "-"


def outputs(report: dict[str, Any]) -> Table:
    """One row per model output: its kind (and where the kind came from), its task figure, and the
    regression figures every float output has. Integer outputs have exact agreement only."""
    rows: list[list[Any]] = []
    for name, fig in report.get("outputs", {}).items():
        kind = fig.get("kind", "float")
        source = str(fig.get("kind_source", "")).split(":")[0]
        label = f"{kind} ({source})" if source else kind
        if kind == "integer":
            rows.append([name, label, _shape(fig.get("shape")), _task_figure(fig), "n/a", "n/a", "-"])
            continue
        nonfinite = f"{fig.get('nonfinite_fp32', 0)} / {fig.get('nonfinite_int8', 0)}"
        rows.append(
            [
                name,
                label,
                _shape(fig.get("shape")),
                _task_figure(fig),
                fig.get("snr_db"),
                fig.get("cosine_min"),
                nonfinite,
            ]
        )
    head = ["output", "kind", "shape", "task figure", "SNR dB", "cosine min", "non-finite"]
    caption = (
        f"{report.get('evaluation_samples', '?')} held-out samples. Kind: declared, inferred, or the "
        "default (regression); the gate holds each output to its kind's figures. Non-finite: fp32 / int8."
    )
    return Table("outputs", "int8 vs fp32", head, rows, caption)


def checks(report: dict[str, Any]) -> Table | None:
    """Every figure the gate held to a threshold."""
    g = report.get("gate")
    found = g.get("checks") if isinstance(g, dict) else None
    if not found:
        return None
    rows = [
        [
            c.get("output"),
            c.get("figure"),
            c.get("value"),
            f"{c.get('bound')} {fmt(c.get('threshold'))}",
            c.get("passed"),
        ]
        for c in found
    ]
    return Table("checks", "gate checks", ["output", "figure", "value", "threshold", "passed"], rows)


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
    target = sz.get("target")
    caption = ""
    if isinstance(target, dict):
        verdict = "met" if target.get("met") else "not met"
        figure = f"{fmt(target.get('value'))} <= {target.get('limit')}"
        caption = f"size target ({target.get('rule')}): {figure}, {verdict}"
    out = [Table("size", "size", ["file", "bytes", "/ float"], files, caption)]
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


def precision_mix(report: dict[str, Any]) -> str:
    """What shipped, in one line: ``8-bit``, ``8-bit, 2 layer(s) a16``, ``1 recurrent layer(s) dynamic
    int8, the rest float``, ``8-bit (search exhausted)``; ``, recurrent layers dynamic int8`` when
    they went dynamic on top."""
    mixed = report.get("mixed_precision")
    if not isinstance(mixed, dict):
        return "8-bit"
    chosen, recurrent = mixed.get("chosen"), mixed.get("recurrent")
    on_top = (
        ", recurrent layers dynamic int8" if isinstance(recurrent, dict) and recurrent.get("passed") else ""
    )
    if isinstance(chosen, dict) and chosen.get("mode") == "dynamic":
        return f"{chosen.get('count')} recurrent layer(s) dynamic int8, the rest float"
    if isinstance(chosen, dict):
        return f"8-bit, {chosen.get('count')} layer(s) {chosen.get('mode')}{on_top}"
    if "stopped" not in mixed:
        return f"8-bit{on_top}" if "error" not in mixed else "8-bit (search failed)"
    return f"8-bit (search {mixed.get('stopped')})"


def precision(report: dict[str, Any]) -> Table | None:
    """The precision mix that ships and what it cost: the mixed-precision search, recurrent layers
    made dynamic, and on Ethos-U the Vela cost of the mix beside the all-8-bit model."""
    mixed = report.get("mixed_precision")
    if not isinstance(mixed, dict):
        return None
    rows: list[list[Any]] = [["shipped", precision_mix(report)]]
    chosen = mixed.get("chosen")
    if isinstance(chosen, dict):
        rows.append(["layers kept wider", chosen.get("layers")])
    if mixed.get("triggered_by"):
        rows.append(["8-bit missed the gate", mixed["triggered_by"][0]])
    if "tries" in mixed:
        tries = mixed["tries"]
        rows.append(["tries", f"{len(tries)} in {fmt(mixed.get('seconds'))} s, {mixed.get('stopped')}"])
    cost = mixed.get("cost") or {}
    if cost:
        rows.append(
            [
                "size vs 8-bit / all-16-bit",
                f"{fmt(cost.get('size_ratio_to_8bit'))} / {fmt(cost.get('size_ratio_to_all16'))}",
            ]
        )
        rows.append(
            [
                "host latency vs 8-bit / all-16-bit",
                f"{fmt(cost.get('latency_ratio_to_8bit'))} / {fmt(cost.get('latency_ratio_to_all16'))}",
            ]
        )
    recurrent = mixed.get("recurrent")
    if isinstance(recurrent, dict):
        verdict = (
            "kept" if recurrent.get("passed") else "not kept: " + "; ".join(recurrent.get("failures") or [])
        )
        rows.append(
            [
                f"recurrent ({', '.join(recurrent.get('ops') or [])}) dynamic int8",
                f"{verdict}; {recurrent.get('size_bytes_before')} -> {recurrent.get('size_bytes')} B, "
                f"{fmt(recurrent.get('latency_ms_before'))} -> {fmt(recurrent.get('latency_ms'))} ms",
            ]
        )
    vela = mixed.get("vela")
    if isinstance(vela, dict):
        for side in ("8bit", "chosen"):
            rows.append([f"Vela, {'all 8-bit' if side == '8bit' else 'the mix'}", vela.get(side)])
    if mixed.get("error"):
        rows.append(["search error (8-bit kept)", mixed["error"]])
    return Table(
        "precision", "precision", ["", "value"], rows, "judged on calibration samples by the gate's checks"
    )


def _decided(decided: Any) -> str:
    if not isinstance(decided, dict):
        return "-"
    if decided.get("message"):
        return str(decided["message"])
    bound = decided.get("bound", "min")
    return (
        f"{decided.get('figure')} of {decided.get('output')!r} ({decided.get('kind') or '-'}): "
        f"{fmt(decided.get('value'))}, {bound} {fmt(decided.get('threshold'))}"
    )


def gate(report: dict[str, Any]) -> Table:
    g = report.get("gate")
    if not isinstance(g, dict):
        return Table(
            "gate", "gate", ["verdict"], [[str(g)]], "the bundle was written without the quality gate"
        )
    return Table(
        "gate",
        "gate",
        ["verdict", "decided by"],
        [[g.get("verdict"), _decided(g.get("decided_by"))]],
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
    "mixed_precision",
    "user_metric",
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
        checks(report),
        outputs(report),
        accuracy(report),
        precision(report),
        *size(report),
        *latency(report),
        *npu(report),
        ops(report),
        *method(report),
        notes(report),
        run(report),
    ]
    return [t for t in found if t is not None]


__all__ = ["Table", "fmt", "precision_mix", "tables"]

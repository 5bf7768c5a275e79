"""Compiler figures per real model and target: size, agreement, SNR, host latency, Vela SRAM/flash/cycles.

Rows follow bench/verify.py: baseline = fp32 host latency (1 thread, batch
1), edgefleet = int8; ratio = int8/fp32 latency. The quality figures ride
along in extra keys: the gate's verdict and the figure that decided it (each
output judged by its kind), the precision mix (all 8-bit, or what the
mixed-precision search kept at 16 bits or float), the size target that applies
(<= 0.35 of fp32 over 1 MB; file / quantized data <= 1.25 below), compile time
and peak memory. Needs the models of scripts/fetch_models.py (skips the real
models when the registry is unreachable); a refused model is still measured
(its report comes with the refusal).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np

from compiler.errors import GateFailed
from compiler.gate import Gate
from compiler.pipeline import compile_model
from compiler.realdata import (
    TEXT_CLS_PREPROCESS,
    face_crops,
    photo_crops,
    text_pages,
    voice_windows,
    write_text_line_folder,
)
from compiler.report_tables import precision_mix
from compiler.sources import Preprocess
from signing.keys import generate_keypair

PROJECT = Path(__file__).resolve().parent.parent
JOBS = (
    ("text_direction_cls", ("arm64-cpu", "qnn-htp", "qnn-htp-a16")),
    ("hand_recrop", ("tflite-int8", "ethos-u55-128", "ethos-u65-256")),
    ("face_detection_short_range", ("tflite-int8", "ethos-u55-128", "ethos-u65-256")),
    ("text_detector", ("arm64-cpu", "qnn-htp", "qnn-htp-a16")),
    ("face_landmark", ("tflite-int8", "ethos-u55-128")),
    ("voice_activity", ("arm64-cpu",)),
)
# Outputs whose kind cannot be inferred: the detector's text probability map (DBNet's threshold 0.3),
# the face detector's raw heads (anchor-relative boxes, paired per anchor), the VAD's per-step speech
# probabilities (a sequence: its error after the 64th step decides).
OUTPUT_KINDS = {
    "text_detector": "fetch_name_0=segmentation:threshold=0.3",
    "face_detection_short_range": "regressors=detection:box=cxcywh:scores=classificators:match=index",
    "voice_activity": "speech_probs=sequence:axis=1",
}
# What an application sees of the face detector is its faces after decoding and NMS: a user metric.
GATES = {
    "face_detection_short_range": Gate(
        metric="bench.mediapipe_faces:faces_f1", metric_threshold=0.9, metric_only=True
    )
}


def _saved(compaction: dict[str, int]) -> int | None:
    """Bytes the ONNX compaction (names, value_info, zero zero-points) took off the int8 file."""
    if "bytes_before" not in compaction:
        return None
    return compaction["bytes_before"] - compaction["bytes_after"]


def _decided(decided: dict[str, object] | None) -> str | None:
    """``snr_db of 'regressors' (regression): 24.0``, or the budget message."""
    if not decided:
        return None
    if decided.get("message"):
        return str(decided["message"])
    if decided.get("figure") == "user_metric":
        return f"user metric: {decided.get('value'):.4g}"
    value = decided.get("value")
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{decided.get('figure')} of {decided.get('output')!r} ({decided.get('kind')}): {shown}"


KIND_FIGURES = ("step_error", "box_f1", "box_iou_mean", "boxes_fp32", "boxes_int8", "mask_iou_mean")


def _kind_figures(report: dict[str, object]) -> dict[str, dict[str, object]]:
    """Per output: its kind and the kind's own figures (sequence error, box match, mask IoU)."""
    outputs = report.get("outputs")
    found: dict[str, dict[str, object]] = {}
    if not isinstance(outputs, dict):
        return found
    for name, fig in outputs.items():
        picked = {k: round(v, 4) if isinstance(v, float) else v for k, v in fig.items() if k in KIND_FIGURES}
        if picked:
            found[name] = {"kind": fig.get("kind"), **picked}
    return found


def run(repeats: int = 20) -> list[dict[str, object]]:
    sys.path.insert(0, str(PROJECT / "scripts"))
    fetch_models = importlib.import_module("fetch_models")
    try:
        models = fetch_models.fetch()
    except fetch_models.RegistryUnreachable as exc:
        return [{"bench": "compiler", "skipped": f"registry unreachable: {exc}"}]
    rows: list[dict[str, object]] = []
    key = generate_keypair()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_text_line_folder(root / "tc", 96, seed=0)
        write_text_line_folder(root / "te", 64, seed=1)
        np.savez(root / "hand_recrop_c.npz", x=photo_crops(64, 256, 256, seed=0))
        np.savez(root / "hand_recrop_e.npz", x=photo_crops(32, 256, 256, seed=1))
        faces = [models["astronaut_photo"], models["cameraman_photo"]]
        np.savez(root / "face_detection_short_range_c.npz", x=face_crops(64, 128, faces, seed=0))
        np.savez(root / "face_detection_short_range_e.npz", x=face_crops(32, 128, faces, seed=1))
        for part, count, seed in (("c", 32, 0), ("e", 16, 1)):
            windows = voice_windows(count, 64, seed=seed)
            np.savez(
                root / f"voice_activity_{part}.npz", input=windows["input"], h=windows["h"], c=windows["c"]
            )
        # MediaPipe's landmark model takes [0, 1] pixels; PP-OCR's detector any multiple of 32.
        np.savez(root / "face_landmark_c.npz", x=(photo_crops(64, 192, 192, seed=0) + 1) / 2)
        np.savez(root / "face_landmark_e.npz", x=(photo_crops(32, 192, 192, seed=1) + 1) / 2)
        np.savez(root / "text_detector_c.npz", x=text_pages(32, 320, 320, seed=0))
        np.savez(root / "text_detector_e.npz", x=text_pages(16, 256, 352, seed=1))
        for name, targets in JOBS:
            text = name == "text_direction_cls"
            calib = root / "tc" if text else root / f"{name}_c.npz"
            evals = root / "te" if text else root / f"{name}_e.npz"
            for target in targets:
                try:
                    r = compile_model(
                        models[name],
                        target=target,
                        calib_path=calib,
                        eval_path=evals,
                        out_dir=root / f"{name}-{target}",
                        release_key=key,
                        name=name.replace("_", "-"),
                        version="1",
                        release=1,
                        gate=GATES.get(name, Gate()),
                        preprocess=Preprocess.parse(TEXT_CLS_PREPROCESS) if text else None,
                        output_kinds=OUTPUT_KINDS.get(name),
                        latency_repeats=repeats,
                    ).report
                except GateFailed as refused:
                    r = refused.report
                lat = r["latency"]["threads_1"]
                outs = r["outputs"].values()
                agreement = [o["top1_agreement"] for o in outs if "top1_agreement" in o]
                vela = r.get("npu", {}).get("vela", {})
                rows.append(
                    {
                        "bench": f"compile {name} {target}",
                        "baseline": "fp32 host latency, 1 thread",
                        "baseline_ms": lat["fp32_ms"],
                        "edgefleet_ms": lat["int8_ms"],
                        "ratio": lat["ratio"],
                        "target": "size: <= 0.35 of fp32 over 1 MB, file / quantized data <= 1.25 below; "
                        "the gate by output kind",
                        "gate": r["gate"]["verdict"],
                        "decided_by": _decided(r["gate"].get("decided_by")),
                        "precision": precision_mix(r),
                        "size_ratio": r["size"]["ratio"],
                        "size_target": r["size"]["target"]["rule"],
                        "size_target_value": r["size"]["target"]["value"],
                        "size_target_met": r["size"]["target"]["met"],
                        "compile_s": r.get("compile_seconds"),
                        "peak_rss_mb": round(r["memory"]["peak_rss_bytes"] / 2**20),
                        "calibration_batch": r["memory"].get("calibration_batch"),
                        # int8 constants + quantization params over the fp32 file: what no table rewrite
                        # can go below; the rest of the int8 file is FlatBuffers/protobuf structure.
                        "data_ratio": r["size"]["parts"]["data_ratio"],
                        "int8_structure_kb": round(r["size"]["parts"]["int8"]["structure"] / 1024, 1),
                        "fp32_structure_kb": round(r["size"]["parts"]["fp32"]["structure"] / 1024, 1),
                        # Ethos-U ships Vela's file, not the int8 TFLite the ratio above is of.
                        "shipped_ratio": r["size"]["artifact_ratio"],
                        "top1_agreement": min(agreement) if agreement else None,
                        "kind_figures": _kind_figures(r),
                        "user_metric": (r.get("user_metric") or {}).get("value"),
                        "mixed_cost": (r.get("mixed_precision") or {}).get("cost") or None,
                        "recurrent_dynamic": (r.get("mixed_precision") or {}).get("recurrent"),
                        "snr_db_min": min(o["snr_db"] for o in outs if o["snr_db"] is not None),
                        "latency_ratio_2_threads": r["latency"]["threads_2"]["ratio"],
                        "vela_sram_kib": vela.get("sram_kib"),
                        "vela_flash_kib": (vela.get("flash_kib", 0) + vela.get("dram_kib", 0))
                        if vela
                        else None,
                        "vela_cycles": vela.get("cycles_total"),
                        "vela_cpu_fraction": vela.get("cpu_fraction"),
                        "calibration": r["method"].get("calibrate_method", r["method"].get("calibration")),
                        "compacted_bytes_saved": _saved(r["method"].get("compaction", {})),
                    }
                )
    return rows

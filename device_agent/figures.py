"""Figures of an int8 output against its fp32 original, one function per output kind.

Pure functions of two arrays (sample axis first) and the kind's parameters
(``compiler.output_kinds``); ``compiler.evaluate`` runs the models and calls
them, ``compiler.gate`` holds the figures to thresholds, and the device's
acceptance check (``device_agent.acceptance``) computes the same figures on the
device's own runtime. They live here, beside the agent, because the agent must
install without the compiler's dependencies and both sides must measure alike:
numpy is all this module needs. Every float output
gets the regression figures (SNR, cosine, errors) whatever its kind, so they
are always in the report; the kind adds its own, and decides which of them the
gate applies.

The report is strict JSON (signed into the manifest): a figure that cannot be
measured (non-finite outputs) is ``None``, a perfect SNR is capped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SNR_CAP_DB = 120.0
MAX_BOXES = 300  # per sample and side: matching is quadratic, detectors keep far fewer after NMS
MAX_STEP_ERRORS = 64  # per-step errors listed in the report


def regression(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Cosine (mean and worst sample), SNR over the whole output, max and relative errors."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    if not (np.isfinite(ref64).all() and np.isfinite(out64).all()) or ref64.size == 0:
        keys = ("cosine_mean", "cosine_min", "snr_db", "max_abs_error", "max_relative_error")
        return {k: None for k in (*keys, "mean_relative_error")}
    a, b = ref64.reshape(len(ref64), -1), out64.reshape(len(out64), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where((na == 0) & (nb == 0), 1.0, (a * b).sum(axis=1) / (na * nb))
    cos = np.nan_to_num(cos, nan=0.0)  # one side all-zero, the other not: no similarity
    diff = np.abs(ref64 - out64)
    signal, noise = float((ref64**2).sum()), float((diff**2).sum())
    snr = SNR_CAP_DB if noise == 0 else min(SNR_CAP_DB, 10 * math.log10(max(signal, 1e-300) / noise))
    spread = float(np.ptp(ref64)) or 1.0
    scale = float(np.abs(ref64).mean()) or 1.0
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "snr_db": snr,
        "max_abs_error": float(diff.max()),
        "max_relative_error": float(diff.max() / spread),  # relative to the fp32 output's range
        "mean_relative_error": float(diff.mean() / scale),  # relative to the mean |fp32| value
    }


def classification(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement: the share of samples whose highest-scoring class is unchanged."""
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        return {"top1_agreement": None}
    agree = np.argmax(ref.reshape(len(ref), -1), axis=-1) == np.argmax(out.reshape(len(out), -1), axis=-1)
    return {"top1_agreement": float(agree.mean()) if len(agree) else None}


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(scores.reshape(len(scores), -1), axis=-1) == labels).mean())


def integer(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Exact agreement of an integer output: per sample (the whole output equal) and per element."""
    same = ref.reshape(len(ref), -1) == out.reshape(len(out), -1)
    per_sample = same.all(axis=1)
    return {
        "exact_agreement": float(per_sample.mean()) if len(per_sample) else None,
        "element_agreement": float(same.mean()) if same.size else None,
        "changed_samples": int((~per_sample).sum()),
    }


def _sigmoid_if_logits(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    if x.size and (x.min() < 0 or x.max() > 1):
        return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
    return x


def _xyxy(boxes: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "cxcywh":
        cx, cy, w, h = (boxes[..., i] for i in range(4))
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    return boxes[..., :4]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] with every box in ``b`` [m, 4] (xyxy; degenerate boxes give 0)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_boxes(a: np.ndarray, b: np.ndarray, min_iou: float) -> list[float]:
    """Greedy one-to-one matching by highest IoU; the IoUs of the matched pairs."""
    if len(a) == 0 or len(b) == 0:
        return []
    iou = iou_matrix(a, b)
    matched: list[float] = []
    while True:
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        best = float(iou[i, j])
        if best < min_iou:
            return matched
        matched.append(best)
        iou[i, :], iou[:, j] = -1.0, -1.0


def detection(
    ref: np.ndarray,
    out: np.ndarray,
    *,
    box: str = "xyxy",
    threshold: float = 0.5,
    min_iou: float = 0.5,
    ref_scores: np.ndarray | None = None,
    out_scores: np.ndarray | None = None,
    match: str = "iou",
) -> dict[str, Any]:
    """Boxes above the score threshold matched fp32 <-> int8 by IoU, and how often scores agree.

    ``ref``/``out``: ``[N, boxes, 4 + extra]`` (or ``[N, 4 + extra]`` for one box); the score is the
    max of the extra columns, or of ``*_scores`` (``[N, boxes(, classes)]``) when scores are their own
    output, or 1 when there are none. Logits are squashed by a sigmoid. ``box_f1`` is 2 x matched /
    (fp32 boxes + int8 boxes), 1.0 when neither side has a box; ``score_agreement`` the share of
    candidate boxes on the same side of the threshold in both models. ``match="index"`` pairs box
    *i* with box *i* (an anchor-based detector's raw outputs, see ``compiler.output_kinds``): a pair
    counts when both are above the threshold and their IoU reaches ``min_iou``.
    """
    if match not in ("iou", "index"):
        raise ValueError(f"detection match must be 'iou' or 'index', got {match!r}")
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        return {"box_f1": None, "box_iou_mean": None, "score_agreement": None}
    n = len(ref)
    depth = ref.shape[-1]
    a, b = ref.reshape(n, -1, depth).astype(np.float64), out.reshape(n, -1, depth).astype(np.float64)

    def scores(boxes: np.ndarray, separate: np.ndarray | None) -> np.ndarray:
        if separate is not None:
            return _sigmoid_if_logits(separate.reshape(n, boxes.shape[1], -1).max(axis=-1))
        if depth > 4:
            return _sigmoid_if_logits(boxes[..., 4:].max(axis=-1))
        return np.ones(boxes.shape[:2])

    sa, sb = scores(a, ref_scores), scores(b, out_scores)
    xa, xb = _xyxy(a, box), _xyxy(b, box)
    kept_a = kept_b = 0
    ious: list[float] = []
    for i in range(n):
        ia = np.argsort(-sa[i])[:MAX_BOXES]
        ib = np.argsort(-sb[i])[:MAX_BOXES]
        ia, ib = ia[sa[i][ia] >= threshold], ib[sb[i][ib] >= threshold]
        kept_a, kept_b = kept_a + len(ia), kept_b + len(ib)
        if match == "index":
            both = np.intersect1d(ia, ib)
            pairs = [float(iou_matrix(xa[i][j : j + 1], xb[i][j : j + 1])[0, 0]) for j in both]
            ious += [v for v in pairs if v >= min_iou]
        else:
            ious += match_boxes(xa[i][ia], xb[i][ib], min_iou)
    return {
        "box_f1": 1.0 if kept_a + kept_b == 0 else 2 * len(ious) / (kept_a + kept_b),
        "box_iou_mean": float(np.mean(ious)) if ious else (1.0 if kept_a + kept_b == 0 else 0.0),
        "score_agreement": float(((sa >= threshold) == (sb >= threshold)).mean()),
        "boxes_fp32": kept_a,
        "boxes_int8": kept_b,
        "boxes_matched": len(ious),
        "threshold": threshold,
        "match": match,
    }


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample IoU of boolean masks [N, ...]; 1.0 where both are empty."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter, union = (a & b).sum(axis=1), (a | b).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def segmentation(
    ref: np.ndarray, out: np.ndarray, *, threshold: float = 0.5, axis: int | None = None
) -> dict[str, Any]:
    """Mask IoU per sample: masks at ``threshold`` (probabilities; logits are squashed), or with
    ``axis`` the argmax class map, IoU averaged over the classes present in either model's map."""
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        return {"mask_iou_mean": None, "mask_iou_min": None, "pixel_agreement": None}
    if axis is None:
        ma, mb = _sigmoid_if_logits(ref) >= threshold, _sigmoid_if_logits(out) >= threshold
        ious = _iou(ma, mb)
        agree = float((ma == mb).mean())
    else:
        ca, cb = np.argmax(ref, axis=axis), np.argmax(out, axis=axis)
        per_class = []
        for c in np.union1d(np.unique(ca), np.unique(cb)):
            present = ((ca == c).reshape(len(ca), -1).any(axis=1)) | (
                (cb == c).reshape(len(cb), -1).any(axis=1)
            )
            per_class.append(np.where(present, _iou(ca == c, cb == c), np.nan))
        ious = np.nanmean(np.stack(per_class), axis=0) if per_class else np.ones(len(ref))
        agree = float((ca == cb).mean())
    return {
        "mask_iou_mean": float(np.mean(ious)),
        "mask_iou_min": float(np.min(ious)),
        "pixel_agreement": agree,
        "threshold": None if axis is not None else threshold,
    }


def sequence(ref: np.ndarray, out: np.ndarray, *, axis: int = 1, step: int | None = None) -> dict[str, Any]:
    """Relative RMS error per time step (over samples and features); the one after ``step`` steps
    (1-based, default the last) decides: a recurrent model's error compounds along the sequence."""
    if not (np.isfinite(ref).all() and np.isfinite(out).all()) or ref.ndim < 2:
        return {"step_error": None, "step": step}
    a = np.moveaxis(ref.astype(np.float64), axis, 1)
    b = np.moveaxis(out.astype(np.float64), axis, 1)
    steps = a.shape[1]
    a, b = a.reshape(len(a), steps, -1), b.reshape(len(b), steps, -1)
    signal = np.sqrt((a**2).sum(axis=(0, 2)))
    noise = np.sqrt(((a - b) ** 2).sum(axis=(0, 2)))
    with np.errstate(divide="ignore", invalid="ignore"):
        errors = np.where(signal > 0, noise / np.maximum(signal, 1e-300), np.where(noise > 0, np.inf, 0.0))
    chosen = steps if step is None else max(1, min(int(step), steps))
    picks = np.unique(np.linspace(0, steps - 1, min(steps, MAX_STEP_ERRORS)).round().astype(int))
    value = float(errors[chosen - 1])
    return {
        "step_error": value if math.isfinite(value) else None,
        "step": chosen,
        "steps": steps,
        # [step (1-based), relative error] at up to MAX_STEP_ERRORS evenly spaced steps
        "step_errors": [[int(i) + 1, round(float(errors[i]), 6)] for i in picks if math.isfinite(errors[i])],
    }


def of_kind(
    kind: str,
    params: dict[str, str],
    ref: np.ndarray,
    out: np.ndarray,
    scores: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Every figure of one output for its kind: an integer-typed output is compared for equality (a
    label has no geometry), a float one gets the regression figures plus its kind's own.

    ``params``: the kind's parameters as declared (strings); ``scores``: the (fp32, int8) score output
    a detection output names with ``scores=``."""
    if ref.dtype.kind in "biu" and kind in ("integer", "classification", "regression"):
        return {"kind": "integer", **integer(ref, out)}
    found: dict[str, Any] = regression(ref, out)
    if kind == "classification":
        found.update(classification(ref, out))
    elif kind == "detection":
        found.update(
            detection(
                ref,
                out,
                box=params.get("box", "xyxy") or "xyxy",
                threshold=float(params.get("threshold", "0.5") or 0.5),
                min_iou=float(params.get("iou", "0.5") or 0.5),
                match=params.get("match", "iou") or "iou",
                ref_scores=scores[0] if scores else None,
                out_scores=scores[1] if scores else None,
            )
        )
    elif kind == "segmentation":
        axis = params.get("axis")
        found.update(
            segmentation(
                ref,
                out,
                threshold=float(params.get("threshold", "0.5") or 0.5),
                axis=int(axis) if axis is not None else None,
            )
        )
    elif kind == "sequence":
        step = params.get("step")
        found.update(
            sequence(
                ref, out, axis=int(params.get("axis", "1") or 1), step=int(step) if step is not None else None
            )
        )
    return found

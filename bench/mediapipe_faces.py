"""A user metric for MediaPipe's short-range face detector: faces after decoding and NMS, float vs int8.

The detector's raw outputs are 896 anchor-relative boxes (``regressors``
``[896, 16]``: centre offset, size, six keypoints, in pixels of its 128x128
input) and their logits (``classificators`` ``[896, 1]``). The built-in
detection kind judges them per anchor (``match=index``) before any NMS, so a
face that the float model finds with 6 anchors and the int8 model with 8
counts as 2 extra boxes. What an application sees is the faces *after*
decoding and non-maximum suppression; this metric builds them the way
MediaPipe's graph does (its SSD anchor layout and box decoding from
``face_detection_short_range.pbtxt``; greedy NMS at IoU 0.3 where MediaPipe
blends overlapping boxes) and returns the F1 of int8 faces matched to float
faces at IoU >= 0.5 (``device_agent.figures.detection``).

Use: ``--metric bench.mediapipe_faces:faces_f1 --metric-threshold 0.9``.
"""

from __future__ import annotations

import numpy as np

from device_agent.figures import detection, iou_matrix

INPUT = 128
STRIDES = (8, 16, 16, 16)  # four anchor layers; layers of equal stride share one grid
ANCHORS_PER_LAYER = 2  # aspect ratio 1.0 and the interpolated scale
SCORE_THRESHOLD = 0.5
NMS_IOU = 0.3
MAX_FACES = 16


def anchor_centres() -> np.ndarray:
    """``[896, 2]`` anchor centres (x, y) in [0, 1], in the order of the model's outputs."""
    centres: list[tuple[float, float]] = []
    layer = 0
    while layer < len(STRIDES):
        stride, per_cell = STRIDES[layer], 0
        while layer < len(STRIDES) and STRIDES[layer] == stride:
            per_cell += ANCHORS_PER_LAYER
            layer += 1
        cells = INPUT // stride
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * per_cell
    return np.array(centres)


def faces(regressors: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """One sample's faces: ``[MAX_FACES, 5]`` (x0, y0, x1, y1 in [0, 1], score), unused rows score 0."""
    centres = anchor_centres()
    raw = regressors.reshape(len(centres), -1)[:, :4] / INPUT
    cx, cy = raw[:, 0] + centres[:, 0], raw[:, 1] + centres[:, 1]
    boxes = np.stack([cx - raw[:, 2] / 2, cy - raw[:, 3] / 2, cx + raw[:, 2] / 2, cy + raw[:, 3] / 2], axis=1)
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100, 100)))
    order = [int(i) for i in np.argsort(-scores) if scores[i] >= SCORE_THRESHOLD]
    kept: list[int] = []
    while order and len(kept) < MAX_FACES:
        best, order = order[0], order[1:]
        kept.append(best)
        if order:
            overlap = iou_matrix(boxes[best : best + 1], boxes[order])[0]
            order = [i for i, v in zip(order, overlap, strict=True) if v < NMS_IOU]
    out = np.zeros((MAX_FACES, 5))
    out[: len(kept), :4], out[: len(kept), 4] = boxes[kept], scores[kept]
    return out


def _all_faces(outputs: dict[str, np.ndarray]) -> np.ndarray:
    regressors, logits = outputs["regressors"], outputs["classificators"]
    return np.stack([faces(regressors[i], logits[i]) for i in range(len(regressors))])


def face_figures(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray]) -> dict[str, float]:
    """``device_agent.figures.detection`` of the decoded, suppressed faces (box F1, IoU, counts)."""
    return detection(_all_faces(fp32), _all_faces(int8), threshold=SCORE_THRESHOLD, min_iou=0.5)


def faces_f1(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
    """F1 of the int8 model's faces against the float model's (IoU >= 0.5), after decoding and NMS."""
    return float(face_figures(fp32, int8)["box_f1"])

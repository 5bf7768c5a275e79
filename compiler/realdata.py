"""Calibration/evaluation data for the real models of ``scripts/fetch_models.py``, made here.

No data set can be downloaded, so we make inputs of the right kind from
what ships in packages: photo crops from scikit-learn's two sample photos
(``load_sample_images``: real camera images, so activations have realistic
ranges) for the MediaPipe detectors, and text lines drawn with Pillow,
upright (class 0) and rotated 180 degrees (class 1), for PaddleOCR's
text-direction classifier, which gives labelled data and a real accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = [
    *("edge", "fleet", "model", "update", "signed", "bundle", "rollout"),
    *("device", "sensor", "camera", "2026", "OCR", "text", "line"),
]


def photo_crops(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``n`` random crops of the sample photos, resized, NHWC float32 in [-1, 1] (MediaPipe's input)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = np.empty((n, height, width, 3), dtype=np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.shape[:2]) // 4, min(photo.shape[:2])))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((width, height))
        out[i] = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return out


def write_text_line_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` text-line PNGs in ``0_upright/`` and ``1_rotated180/`` (labels by sub-folder order)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=22)
    for sub in ("0_upright", "1_rotated180"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 4))))
        shade = int(rng.integers(180, 256))
        img = Image.new("RGB", (192, 48), (shade, shade, shade))
        ink = int(rng.integers(0, 80))
        ImageDraw.Draw(img).text(
            (int(rng.integers(2, 20)), int(rng.integers(4, 16))), text, fill=(ink,) * 3, font=font
        )
        rotated = i % 2 == 1
        if rotated:
            img = img.rotate(180)
        img.save(folder / ("1_rotated180" if rotated else "0_upright") / f"{i:04d}.png")
    return folder


# PaddleOCR's classifier preprocessing: RGB, 48x192, NCHW, (x / 255 - 0.5) / 0.5.
TEXT_CLS_PREPROCESS = "size=48x192,layout=NCHW,scale=0.00392156862745098,mean=0.5,std=0.5"

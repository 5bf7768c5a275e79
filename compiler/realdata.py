"""Calibration/evaluation data for the real models of ``scripts/fetch_models.py``, made here.

No data set can be downloaded, so we make inputs of the right kind from
what ships in packages: photo crops from scikit-learn's two sample photos
(``load_sample_images``: real camera images, so activations have realistic
ranges) for the MediaPipe detectors, and text lines drawn with Pillow,
upright (class 0) and rotated 180 degrees (class 1), for PaddleOCR's
text-direction classifier, which gives labelled data and a real accuracy.
The text lines are laid out the way PaddleOCR's pipeline feeds its
classifier (tight crop of a detected box, aspect kept, grey right padding):
calibration and evaluation data must look like what the device will see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

WORDS = [
    *("edge", "fleet", "model", "update", "signed", "bundle", "rollout"),
    *("device", "sensor", "camera", "2026", "OCR", "text", "line"),
    *("Invoice", "Total:", "$12.50", "Street", "No.", "Date", "01/03/2025", "www.example.com"),
    *("QTY", "Name", "ID", "Price", "Station", "Exit", "Open", "Hours"),
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


def text_fonts() -> list[Path]:
    """TrueType fonts to draw text lines with: matplotlib's DejaVu family when installed, else none.

    Without them the lines are drawn with Pillow's bundled font (one face only).
    """
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return []
    ttf = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
    # The "Display" faces carry almost no glyphs.
    return sorted(p for p in ttf.glob("DejaVu*.ttf") if "Display" not in p.name)


def text_line_image(rng: np.random.Generator, fonts: list[Path], photos: list[np.ndarray]) -> Any:
    """One upright text line as PaddleOCR's classifier gets it: a tight crop of a detected text box.

    Fonts, sizes, ink and paper colours vary; some lines sit on blurred photo texture, some are light
    on dark, slightly blurred or tilted. The crop is then resized like PaddleOCR's ``resize_norm_img``:
    height 48, width ``min(192, ceil(48 * w / h))``, right-padded to 192 with the value that
    normalises to 0 (grey 128).
    """
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    size = int(rng.integers(18, 40))
    font = (
        ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
        if fonts
        else ImageFont.load_default(size=size)
    )
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 5))))
    left, top, right, bottom = font.getbbox(text)
    mx, my = int(rng.integers(1, 8)), int(rng.integers(1, 6))
    w, h = int(right - left) + 2 * mx, int(bottom - top) + 2 * my
    photo = photos[int(rng.integers(len(photos)))]
    if rng.random() < 0.3 and w < photo.shape[1] and h < photo.shape[0]:
        y0, x0 = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        texture = Image.fromarray(photo[y0 : y0 + h, x0 : x0 + w]).filter(ImageFilter.GaussianBlur(3))
        img = Image.blend(texture, Image.new("RGB", (w, h), (230, 230, 230)), 0.6)
    else:
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(170, 256, size=3)))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    if rng.random() < 0.2:  # light text on a dark sign
        img = Image.eval(img, lambda v: 255 - v)
        ink = tuple(255 - v for v in ink)
    ImageDraw.Draw(img).text((mx - left, my - top), text, fill=ink, font=font)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    return img.rotate(
        float(rng.uniform(-3, 3)), resample=Image.Resampling.BILINEAR, fillcolor=img.getpixel((0, 0))
    )


def write_text_line_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` text-line PNGs in ``0_upright/`` and ``1_rotated180/`` (labels by sub-folder order).

    Each PNG is already 192x48, laid out as PaddleOCR feeds its classifier (see ``text_line_image``),
    so ``TEXT_CLS_PREPROCESS`` only has to scale it. An earlier version drew small text in the middle of
    a 192x48 canvas: inputs the classifier never sees behind PaddleOCR's detector (fp32 accuracy 0.90,
    14% of lines below 0.9 confidence, vs 1.00 / 1.5% here), which sat near the decision boundary and
    made the int8 model look much worse than it is on real text lines.
    """
    import math

    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    fonts, photos = text_fonts(), list(load_sample_images().images)
    for sub in ("0_upright", "1_rotated180"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        line = text_line_image(rng, fonts, photos)
        rotated = i % 2 == 1
        if rotated:
            line = line.rotate(180)
        width = min(192, math.ceil(48 * line.width / line.height))
        canvas = Image.new("RGB", (192, 48), (128, 128, 128))
        canvas.paste(line.resize((width, 48), Image.Resampling.BILINEAR), (0, 0))
        canvas.save(folder / ("1_rotated180" if rotated else "0_upright") / f"{i:04d}.png")
    return folder


# PaddleOCR's classifier preprocessing: RGB, 48x192, NCHW, (x / 255 - 0.5) / 0.5.
TEXT_CLS_PREPROCESS = "size=48x192,layout=NCHW,scale=0.00392156862745098,mean=0.5,std=0.5"


def text_pages(n: int, height: int = 320, width: int = 320, seed: int = 0) -> np.ndarray:
    """``n`` page crops with 2-6 text lines each, as PaddleOCR's text detector gets them.

    Lines (``text_line_image``) pasted at random places on paper or on a blurred photo crop, the
    page normalised like PaddleOCR's ``NormalizeImage`` (ImageNet mean/std), NCHW float32. Height and
    width should be multiples of 32 (the detector's ``DetResizeForTest`` makes them so).
    """
    from PIL import Image, ImageFilter
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    fonts, photos = text_fonts(), list(load_sample_images().images)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i in range(n):
        if rng.random() < 0.5:
            page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, size=3)))
        else:
            photo = photos[int(rng.integers(len(photos)))]
            y0 = int(rng.integers(0, photo.shape[0] - height))
            x0 = int(rng.integers(0, photo.shape[1] - width))
            page = Image.fromarray(photo[y0 : y0 + height, x0 : x0 + width]).filter(
                ImageFilter.GaussianBlur(2)
            )
        for _ in range(int(rng.integers(2, 7))):
            line = text_line_image(rng, fonts, photos)
            if line.width >= width or line.height >= height:
                line = line.resize((min(line.width, width - 8), min(line.height, height - 8)))
            x = int(rng.integers(0, width - line.width))
            y = int(rng.integers(0, height - line.height))
            page.paste(line, (x, y))
        arr = (np.asarray(page, dtype=np.float32) / 255.0 - mean) / std
        out[i] = arr.transpose(2, 0, 1)
    return out


SAMPLE_RATE = 16000
VAD_CHUNK, VAD_CONTEXT = 512, 64  # Silero's 16 kHz chunk and the tail of the previous chunk it prepends


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Synthetic speech at 16 kHz: voiced stretches and pauses, no recording involved.

    No speech recording ships in a package we can fetch, so voiced stretches are made the way a
    formant synthesiser makes vowels: a glottal pulse train (pitch 90-230 Hz with slow vibrato)
    through three formant resonators, a new vowel every 200 ms syllable, syllable envelopes, levels
    between -24 and -4 dBFS; pauses are room noise. Silero's VAD calls most voiced stretches speech
    (probabilities near 1) and the pauses silence, so its per-step probabilities swing over the
    whole range, as on real audio; the timbre is not a human voice.
    """
    from scipy.signal import lfilter

    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n)
    pos = 0
    while pos < n:
        dur = int(rng.uniform(0.3, 1.2) * SAMPLE_RATE)
        if rng.random() < 0.4:
            seg = rng.normal(0, rng.uniform(0.001, 0.01), dur)
        else:
            t = np.arange(dur) / SAMPLE_RATE
            f0 = rng.uniform(90, 230) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
            pulses = np.diff(np.floor(np.cumsum(f0 / SAMPLE_RATE)), prepend=0.0)
            source = lfilter([1.0], [1.0, -0.95], pulses) + rng.normal(0, 0.02, dur)
            seg = np.zeros(dur)
            syllable = int(0.2 * SAMPLE_RATE)
            for start in range(0, dur, syllable):
                y = source[start : start + syllable]
                formants = (rng.uniform(300, 850), rng.uniform(850, 2300), rng.uniform(2300, 3000))
                for freq, bandwidth in zip(formants, (80, 100, 120), strict=True):
                    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
                    theta = 2 * np.pi * freq / SAMPLE_RATE
                    y = lfilter([1 - r], [1.0, -2 * r * np.cos(theta), r * r], y)
                seg[start : start + syllable] = y * np.sin(np.pi * np.arange(len(y)) / len(y)) ** 0.5
            seg = seg / (np.abs(seg).max() + 1e-9) * rng.uniform(0.06, 0.6) + rng.normal(0, 0.003, dur)
        out[pos : pos + dur] = seg[: n - pos]
        pos += dur
    return out.astype(np.float32)


def voice_windows(n: int, steps: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` windows of ``steps`` Silero chunks each (512 samples + 64 of context, 32 ms a step), as
    ``voice_activity.onnx`` takes them: ``input [n, steps, 576]`` and the zero LSTM state of a stream's
    start (``h``, ``c``: ``[n, 1, 128]``)."""
    rng = np.random.default_rng(seed)
    windows = np.empty((n, steps, VAD_CHUNK + VAD_CONTEXT), np.float32)
    for i in range(n):
        audio = speech_like(rng, steps * VAD_CHUNK / SAMPLE_RATE)
        context = np.zeros(VAD_CONTEXT, np.float32)
        for step in range(steps):
            chunk = audio[step * VAD_CHUNK : (step + 1) * VAD_CHUNK]
            windows[i, step] = np.concatenate([context, chunk])
            context = chunk[-VAD_CONTEXT:]
    state = np.zeros((n, 1, 128), np.float32)
    return {"input": windows, "h": state, "c": state.copy()}


def face_crops(n: int, size: int, photos: list[Path], seed: int = 0) -> np.ndarray:
    """``n`` square crops of ``photos`` (files with faces: scikit-image's astronaut and cameraman),
    NHWC float32 in [-1, 1] as MediaPipe's face detector takes them.

    Crops of 45-95% of the photo's short side at random places, some mirrored, some darker or
    brighter: about half hold a whole face the float detector finds, the rest a part of one or
    none, so its boxes, its misses and its near-threshold scores are all exercised.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    out = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        photo = images[i % len(images)]
        short = min(photo.shape[:2])
        side = int(rng.uniform(0.45, 0.95) * short)
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = np.asarray(Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size)), np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop * rng.uniform(0.7, 1.2), 0, 255)
        out[i] = crop / 127.5 - 1.0
    return out

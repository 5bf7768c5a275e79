"""Where calibration and evaluation samples come from: ``.npz``, a folder of images, or a callable.

- ``.npz``: see ``compiler.data``.
- a folder of images with a declared ``Preprocess`` (size, layout, scale,
  mean/std): files directly in the folder are unlabelled; files in
  sub-folders are labelled by the sub-folder's index in sorted order
  (``0_up/``, ``1_down/``), the layout ``torchvision.datasets.ImageFolder``
  popularised. Pillow decodes (extra ``compiler``).
- ``module:function`` (or a Python callable passed to the API): called with
  no arguments, returns a dict laid out like an ``.npz``, an array (single
  input), or ``(inputs, labels)``. For data made by code (augmentations, a
  data loader) without writing files.

Every source ends in the same validation against the model's inputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.data import Samples, load_samples, samples_from_arrays
from compiler.errors import InvalidData
from compiler.signature import TensorSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm")
DataSource = Path | str | Samples | Callable[[], Any]


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: resize to (height, width), RGB, x * scale, (x - mean) / std."""

    size: tuple[int, int] | None = None  # default: the model's declared spatial size
    layout: str = "NCHW"  # or NHWC
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise InvalidData(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if any(s == 0 for s in self.std):
            raise InvalidData("std must not contain 0")

    @classmethod
    def parse(cls, text: str) -> Preprocess:
        """``size=48x192,layout=NCHW,scale=0.00392,mean=0.5,std=0.5`` (mean/std per channel with ``/``)."""
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise InvalidData(f"preprocessing: expected key=value, got {part!r}")
            try:
                if key == "size":
                    h, w = value.lower().split("x")
                    fields["size"] = (int(h), int(w))
                elif key == "layout":
                    fields["layout"] = value.upper()
                elif key == "scale":
                    fields["scale"] = float(value)
                elif key in ("mean", "std"):
                    fields[key] = tuple(float(v) for v in value.split("/"))
                else:
                    raise InvalidData(f"preprocessing: unknown key {key!r} (size, layout, scale, mean, std)")
            except InvalidData:
                raise
            except ValueError as exc:
                raise InvalidData(f"preprocessing: bad value for {key!r}: {value!r}") from exc
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "layout": self.layout,
            "scale": self.scale,
            "mean": self.mean,
            "std": self.std,
        }


def load_source(source: DataSource, specs: tuple[TensorSpec, ...], pre: Preprocess | None = None) -> Samples:
    if isinstance(source, Samples):
        return samples_from_arrays("samples", {**source.inputs, **_label_dict(source.labels)}, specs)
    if callable(source):
        return _from_callable(source, getattr(source, "__name__", "callable"), specs)
    text = str(source)
    path = Path(text)
    if path.is_dir():
        return load_image_folder(path, specs, pre or Preprocess())
    if not path.exists() and ":" in text and not text.endswith(".npz"):
        module, _, attr = text.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidData(f"{text}: cannot import data callable ({exc})") from exc
        return _from_callable(fn, text, specs)
    return load_samples(path, specs)


def _label_dict(labels: np.ndarray | None) -> dict[str, np.ndarray]:
    return {} if labels is None else {"y": labels}


def _from_callable(fn: Callable[[], Any], name: str, specs: tuple[TensorSpec, ...]) -> Samples:
    try:
        value = fn()
    except Exception as exc:
        raise InvalidData(f"data callable {name} raised {type(exc).__name__}: {exc}") from exc
    labels = None
    if isinstance(value, tuple) and len(value) == 2:
        value, labels = value
    if isinstance(value, np.ndarray):
        value = {"x": value}
    if not isinstance(value, dict):
        raise InvalidData(f"data callable {name} must return a dict, an array or (inputs, labels)")
    arrays = dict(value)
    if labels is not None:
        arrays["y"] = np.asarray(labels)
    return samples_from_arrays(name, arrays, specs)


def load_image_folder(folder: Path, specs: tuple[TensorSpec, ...], pre: Preprocess) -> Samples:
    from PIL import Image, UnidentifiedImageError

    if len(specs) != 1:
        raise InvalidData(f"{folder}: an image folder feeds single-input models only ({len(specs)} inputs)")
    spec = specs[0]
    size = pre.size or _spatial_size(spec, pre.layout)
    if size is None:
        raise InvalidData(f"{folder}: the model input {list(spec.shape)} has no fixed size; declare size=HxW")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    files: list[tuple[Path, int | None]] = [
        (f, None) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    for index, cls in enumerate(classes):
        files += [(f, index) for f in sorted(cls.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InvalidData(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    if classes and any(label is None for _, label in files):
        raise InvalidData(f"{folder}: mixes loose images with class sub-folders; use one layout")
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidData(f"{path}: not a readable image ({exc})") from exc
        x = (np.asarray(rgb, dtype=np.float32) * pre.scale - mean) / std
        images.append(x.transpose(2, 0, 1) if pre.layout == "NCHW" else x)
    arrays: dict[str, np.ndarray] = {spec.name: np.stack(images).astype(np.float32)}
    if classes:
        arrays["y"] = np.asarray([label for _, label in files], dtype=np.int64)
    return samples_from_arrays(folder, arrays, specs)


def _spatial_size(spec: TensorSpec, layout: str) -> tuple[int, int] | None:
    if len(spec.shape) != 4:
        return None
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None

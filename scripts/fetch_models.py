"""Fetch the real float models the compiler is tested and benchmarked on (``make models``).

No model hub is reachable from our machines, but pinned wheels on PyPI
carry real float models: ``rapidocr-onnxruntime==1.4.4`` (PaddleOCR's
text-direction classifier, a MobileNetV3 in ONNX), ``rapidocr==3.10.0``
(PaddleOCR's PP-OCRv6 small text detector, ONNX, dynamic height and width: a
DBNet whose output is a text probability map) and ``mediapipe==0.10.21``
(``hand_recrop`` and ``face_detection_short_range``, old-schema TFLite, the
latter with fp16 weights; ``face_landmark``, a 468-point landmark regressor),
``silero-vad==6.2.3`` (Silero's voice activity detector in its sequence form:
an STFT and conv encoder per 32 ms chunk, then an LSTM over the chunks, with
its state in and out) and ``scikit-image==0.25.2`` (two photos with faces,
``astronaut.png`` and ``camera.png``, for the face detector's data: without
faces in its input a detector's boxes are never exercised).
We ``pip download --no-deps`` the wheels into a cache and unzip just those
files, checking each against its pinned sha256 so a changed wheel cannot
silently change what the tests measure.

Silero's sequence model has no batch axis (``input [steps, 576]``: its first
axis is time), while a compile's data puts samples first. ``with_batch_axis``
writes ``voice_activity.onnx`` beside it: the same graph behind a
``Squeeze`` of a leading batch axis of 1 on the input and an ``Unsqueeze`` on
the per-step speech probabilities (``speech_probs [1, steps]``), which is what
a user does with onnx's helpers before compiling such a model.

Idempotent: models already extracted with the right digest are not fetched
again. Exit codes: 0 ok, 2 the package registry cannot be reached (tests
treat that as "skip"), 1 anything else (bad wheel, digest mismatch).

Usage: ``python scripts/fetch_models.py [--cache DIR]``; prints one line per
model, ``name path``. ``DEFAULT_CACHE`` is ``.cache/models`` in the project.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = PROJECT / ".cache" / "models"
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2
UNREACHABLE_HINTS = (
    "Could not find a version",
    "No matching distribution",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Connection refused",
    "Max retries exceeded",
    "Network is unreachable",
    "timed out",
)


@dataclass(frozen=True)
class RealModel:
    """One float model inside a pinned wheel."""

    name: str
    requirement: str  # pip requirement, pinned
    member: str  # path inside the wheel
    filename: str  # name in the cache
    sha256: str
    # A model made from this file (name, file name, bytes -> bytes), rewritten on every fetch.
    derived: tuple[str, str, Callable[[bytes], bytes]] | None = None


def with_batch_axis(data: bytes) -> bytes:
    """Silero's sequence VAD with a leading batch axis of 1 on ``input`` and ``speech_probs``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["input_steps" if i == "input" else i for i in node.input]
        node.output[:] = ["speech_probs_steps" if o == "speech_probs" else o for o in node.output]
    graph.input.remove(next(i for i in graph.input if i.name == "input"))
    graph.input.insert(0, helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "steps", 576]))
    index = [o.name for o in graph.output].index("speech_probs")
    graph.output.remove(graph.output[index])
    probs = helper.make_tensor_value_info("speech_probs", TensorProto.FLOAT, [1, "steps"])
    graph.output.insert(index, probs)
    graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "batch_axis"))
    graph.node.insert(
        0, helper.make_node("Squeeze", ["input", "batch_axis"], ["input_steps"], name="drop_batch")
    )
    graph.node.append(
        helper.make_node(
            "Unsqueeze", ["speech_probs_steps", "batch_axis"], ["speech_probs"], name="add_batch"
        )
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


MODELS = (
    RealModel(
        "text_direction_cls",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "text_direction_cls.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    ),
    RealModel(
        "text_detector",
        "rapidocr==3.10.0",
        "rapidocr/models/PP-OCRv6_det_small.onnx",
        "text_detector.onnx",
        "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f",
    ),
    RealModel(
        "face_landmark",
        "mediapipe==0.10.21",
        "mediapipe/modules/face_landmark/face_landmark.tflite",
        "face_landmark.tflite",
        "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
    ),
    RealModel(
        "hand_recrop",
        "mediapipe==0.10.21",
        "mediapipe/modules/holistic_landmark/hand_recrop.tflite",
        "hand_recrop.tflite",
        "67d996ce96f9d36fe17d2693022c6da93168026ab2f028f9e2365398d8ac7d5d",
    ),
    RealModel(
        "face_detection_short_range",
        "mediapipe==0.10.21",
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "face_detection_short_range.tflite",
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
    ),
    RealModel(
        "silero_vad_sequence",
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        "silero_vad_16k_sequence.onnx",
        "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
        ("voice_activity", "voice_activity.onnx", with_batch_axis),
    ),
    RealModel(
        "astronaut_photo",
        "scikit-image==0.25.2",
        "skimage/data/astronaut.png",
        "astronaut.png",
        "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    ),
    RealModel(
        "cameraman_photo",
        "scikit-image==0.25.2",
        "skimage/data/camera.png",
        "camera.png",
        "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    ),
)


class RegistryUnreachable(RuntimeError):
    """pip could not reach the package index (offline machine, proxy down)."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download(requirement: str, wheels: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel (pip itself skips it when already there)."""
    dist = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    found = sorted(wheels.glob(f"{dist}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["-q", "-d", str(wheels), requirement]
    env = dict(os.environ, PIP_DEFAULT_TIMEOUT=os.environ.get("PIP_DEFAULT_TIMEOUT", "30"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        if any(h.lower() in text.lower() for h in UNREACHABLE_HINTS):
            raise RegistryUnreachable(f"cannot download {requirement}: {text.strip().splitlines()[-1]}")
        raise RuntimeError(f"pip download {requirement} failed: {text.strip()[-500:]}")
    found = sorted(wheels.glob(f"{dist}-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {requirement} succeeded but wrote no wheel to {wheels}")
    return found[0]


def fetch(cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Make sure every model is in ``cache``; return name -> path. Raises RegistryUnreachable."""
    cache = Path(cache)
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for model in MODELS:
        target = cache / model.filename
        if not (target.is_file() and sha256_of(target) == model.sha256):
            _extract(model, target, wheels)
        paths[model.name] = target
        if model.derived is not None:
            name, filename, make = model.derived
            derived = cache / filename
            data = make(target.read_bytes())
            if not (derived.is_file() and derived.read_bytes() == data):
                # A file of its own per writer: test workers fetch at the same time.
                fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{filename}.", suffix=".part")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, derived)
            paths[name] = derived
    return paths


def _extract(model: RealModel, target: Path, wheels: Path) -> None:
    """Unzip ``model.member`` from its wheel into ``target``, refusing a digest that is not pinned."""
    wheel = _download(model.requirement, wheels)
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(model.member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RuntimeError(f"{wheel}: cannot read {model.member}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != model.sha256:
        raise RuntimeError(f"{model.member} in {wheel.name} has sha256 {digest}, expected {model.sha256}")
    tmp = target.with_suffix(target.suffix + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory")
    args = parser.parse_args(argv)
    try:
        paths = fetch(args.cache)
    except RegistryUnreachable as exc:
        print(f"fetch_models: the package registry cannot be reached: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (OSError, RuntimeError) as exc:
        print(f"fetch_models: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for name, path in paths.items():
        print(f"{name} {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

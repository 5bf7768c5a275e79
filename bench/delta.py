"""Delta updates on real models: patch size / full size by method, build and apply cost.

Cases, each compiled through our compiler the same way as its base:

- ``head``: a fine-tune that retrains only the last layer (the digits MLP
  trained here: its head refitted on frozen features; the real models: their
  last weight tensor changed, every other byte of the source as it was);
- ``full retrain`` (digits: trained again from another seed: every weight is new);
- ``all layers ~1%`` (the real models, which cannot be retrained here: every float
  weight moved by ~1%, a light fine-tune of all layers; a full retrain moves more).

Files: the float source (ONNX or TFLite) and what devices install, the int8
compile (ONNX QDQ for ``arm64-cpu``, TFLite for ``tflite-int8``); PP-OCR's text
detector (9.9 MB float ONNX) as a larger file for the build and apply costs.

Methods (bytes a device fetches, over the full file's bytes):

- ``zstd``: the new file compressed alone (what compression without a base gives);
- ``patch-from`` (what edgefleet ships): zstd -19 with the old file as a raw-content
  dictionary and a window over the whole file (``fleet_server.deltas.make_delta``);
- ``bsdiff``: bsdiff4 (for the record: the classic binary diff);
- ``cdc``: content-defined chunks (gear hash, 1-8 KiB, ~2 KiB average) of the
  new file missing from the old one, zstd-compressed (what a chunk store such as
  casync or OSTree static deltas would send, index not counted);
- ``tensor``: ONNX only: the initializers whose bytes changed plus the graph,
  zstd-compressed (what per-tensor chunks would send).

Build and apply run in a fresh interpreter each, and the kernel's peak-RSS mark
is reset after the imports, so ``rss`` is the method's own peak over the
interpreter it ran in. The baseline row
value is the full file; ``ratio`` is patch-from / full.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

    from signing.keys import KeyPair

PROJECT = Path(__file__).resolve().parent.parent
GEAR = np.random.default_rng(20).integers(0, 2**32, 256, dtype=np.uint64)
CDC_MIN, CDC_MAX, CDC_MASK = 1024, 8192, (1 << 11) - 1


# -- the methods --------------------------------------------------------------------------------


def zstd_alone(new: bytes) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=19).compress(new))


def cdc_chunks(data: bytes) -> list[bytes]:
    """Gear-hash content-defined chunks (FastCDC's idea without its normalisation)."""
    chunks, start, h = [], 0, 0
    arr = np.frombuffer(data, dtype=np.uint8)
    for i in range(len(arr)):
        h = ((h << 1) + int(GEAR[arr[i]])) & 0xFFFFFFFF
        size = i - start + 1
        if (size >= CDC_MIN and (h & CDC_MASK) == 0) or size >= CDC_MAX:
            chunks.append(data[start : i + 1])
            start, h = i + 1, 0
    if start < len(data):
        chunks.append(data[start:])
    return chunks


def cdc_patch(old: bytes, new: bytes) -> int:
    have = {hashlib.sha256(c).digest() for c in cdc_chunks(old)}
    missing = b"".join(c for c in cdc_chunks(new) if hashlib.sha256(c).digest() not in have)
    return zstd_alone(missing) if missing else 0


def tensor_patch(old_path: Path, new_path: Path) -> int | None:
    """Changed ONNX initializers + the graph without its initializers, compressed."""
    if old_path.suffix != ".onnx":
        return None
    import onnx

    old, new = onnx.load(str(old_path)), onnx.load(str(new_path))
    have = {hashlib.sha256(t.SerializeToString()).digest() for t in old.graph.initializer}
    changed = [t for t in new.graph.initializer if hashlib.sha256(t.SerializeToString()).digest() not in have]
    del new.graph.initializer[:]
    return zstd_alone(b"".join(t.SerializeToString() for t in changed) + new.SerializeToString())


# -- one measured step in a fresh interpreter ----------------------------------------------------


def _child(argv: list[str]) -> None:
    """``python -m bench.delta <op> base new-or-patch out``: run one op, print its costs as JSON."""
    op, a, b, out = argv
    import bsdiff4  # imported before the baseline RSS: the op is measured, not the import
    import zstandard  # noqa: F401

    from device_agent.delta import rebuild
    from fleet_server.deltas import make_delta

    rss0 = _reset_peak_rss()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if op == "zstd-build":
        make_delta(Path(a), Path(b), Path(out))
    elif op == "zstd-apply":
        length, sha = int(os.environ["LENGTH"]), os.environ["SHA256"]
        rebuild(Path(a), Path(b), Path(out), length=length, sha256=sha)
    elif op == "bsdiff-build":
        bsdiff4.file_diff(a, b, out)
    elif op == "bsdiff-apply":
        bsdiff4.file_patch(a, out, b)
    else:
        raise SystemExit(f"unknown op {op}")
    print(
        json.dumps(
            {
                "s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - cpu0,
                "rss_kb": _status_kb("VmHWM") - rss0,
            }
        )
    )


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current one (Linux: clear_refs 5), so the op's own peak is measured,
    not the imports'; return the current RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _measure(op: str, a: Path, b: Path, out: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.delta", op, str(a), str(b), str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT,
        env={**os.environ, **(env or {})},
    )
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def pair_row(case: str, kind: str, old: Path, new: Path, tmp: Path) -> dict[str, object]:
    old_b, new_b = old.read_bytes(), new.read_bytes()
    full = len(new_b)
    sha = hashlib.sha256(new_b).hexdigest()
    patch, rebuilt, bpatch, bout = tmp / "p.zst", tmp / "out", tmp / "p.bsdiff", tmp / "bout"
    zb = _measure("zstd-build", old, new, patch)
    za = _measure("zstd-apply", old, patch, rebuilt, {"LENGTH": str(full), "SHA256": sha})
    assert rebuilt.read_bytes() == new_b
    bb = _measure("bsdiff-build", old, new, bpatch)
    ba = _measure("bsdiff-apply", old, bpatch, bout)
    assert bout.read_bytes() == new_b
    size = patch.stat().st_size
    tensor = tensor_patch(old, new)
    return {
        "bench": f"delta {case} {kind}",
        "baseline": "full file",
        "baseline_kb": round(full / 1024, 1),
        "edgefleet_kb": round(size / 1024, 1),
        "ratio": round(size / full, 3),
        "target": "< 0.6 (else the full file)",
        "zstd_alone": round(zstd_alone(new_b) / full, 3),
        "bsdiff": round(bpatch.stat().st_size / full, 3),
        "cdc": round(cdc_patch(old_b, new_b) / full, 3),
        "tensor": round(tensor / full, 3) if tensor is not None else None,
        "build_s": round(zb["s"], 3),
        "build_rss_mb": round(zb["rss_kb"] / 1024, 1),
        "apply_s": round(za["s"], 3),
        "apply_rss_mb": round(za["rss_kb"] / 1024, 1),
        "bsdiff_build_s": round(bb["s"], 3),
        "bsdiff_build_rss_mb": round(bb["rss_kb"] / 1024, 1),
        "bsdiff_apply_s": round(ba["s"], 3),
        "bsdiff_apply_rss_mb": round(ba["rss_kb"] / 1024, 1),
    }


# -- the models -----------------------------------------------------------------------------------


def digits_variants(root: Path) -> dict[str, Path]:
    """The digits MLP (64-256-128-10), a head-only fine-tune of it, and a full retrain."""
    import onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    from compiler.examples import _mlp_to_onnx

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    out: dict[str, Path] = {}

    def fit(seed: int) -> MLPClassifier:
        clf = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=200, random_state=seed)
        clf.fit(x[:1400], y[:1400])
        return clf

    base = fit(0)
    coefs, inter = [c.copy() for c in base.coefs_], [b.copy() for b in base.intercepts_]
    # Head-only fine-tune: the frozen features of the newer data, the last layer refitted on them.
    feats = x[400:]
    for w, b in zip(coefs[:-1], inter[:-1], strict=True):
        feats = np.maximum(feats @ w + b, 0)
    onehot = np.eye(10)[y[400:]]
    for _ in range(50):
        logits = feats @ coefs[-1] + inter[-1]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        coefs[-1] -= 0.05 * feats.T @ (p - onehot) / len(feats)
        inter[-1] -= 0.05 * (p - onehot).mean(0)
    full = fit(1)
    for name, (c, b) in {
        "base": (base.coefs_, base.intercepts_),
        "head": (coefs, inter),
        "full": (full.coefs_, full.intercepts_),
    }.items():
        out[name] = root / f"digits-{name}.onnx"
        onnx.save(_mlp_to_onnx(c, b), str(out[name]))
    np.savez(root / "digits-calib.npz", x=x[:400])
    np.savez(root / "digits-eval.npz", x=x[1400:], y=y[1400:])
    return out


def onnx_variants(src: Path, root: Path, stem: str) -> dict[str, Path]:
    """A real ONNX model, its last weight tensor changed (head), every float weight moved ~1% (all)."""
    import onnx
    from onnx import numpy_helper

    def write(name: str, change: Callable[[list[onnx.TensorProto]], None]) -> Path:
        model = onnx.load(str(src))
        # weights are initializers or (PaddleOCR's export) Constant nodes' values
        tensors = list(model.graph.initializer) + [
            a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
        ]
        change([t for t in tensors if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2])
        path = root / f"{stem}-{name}.onnx"
        onnx.save(model, str(path))
        return path

    rng = np.random.default_rng(0)

    def nudge(t: onnx.TensorProto) -> None:
        a = numpy_helper.to_array(t)
        t.CopyFrom(
            numpy_helper.from_array((a * (1 + 0.01 * rng.standard_normal(a.shape))).astype(a.dtype), t.name)
        )

    return {
        "base": write("base", lambda ts: None),
        "head": write("head", lambda ts: nudge(ts[-1])),
        "all": write("all", lambda ts: _each(nudge, ts)),
    }


def _each(f: Callable[[onnx.TensorProto], None], items: list[onnx.TensorProto]) -> None:
    for item in items:
        f(item)


def tflite_variants(src: Path, root: Path, stem: str) -> dict[str, Path]:
    """A real TFLite model: its last large float buffer changed (head), every float buffer moved ~1%."""
    from ai_edge_litert import schema_py_generated as schema

    data = src.read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    spans: list[tuple[int, int]] = []  # (offset, length) of float32/float16 weight buffers, in file order
    for s in range(model.SubgraphsLength()):
        g = model.Subgraphs(s)
        for i in range(g.TensorsLength()):
            t = g.Tensors(i)
            buf = model.Buffers(t.Buffer())
            if buf.DataLength() >= 256 and t.Type() in (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16):
                off = buf._tab.Vector(buf._tab.Offset(4))
                spans.append((off, buf.DataLength()))
    spans.sort()
    rng = np.random.default_rng(0)

    def write(name: str, chosen: list[tuple[int, int]]) -> Path:
        out = bytearray(data)
        for off, n in chosen:
            dtype = np.float16 if n % 4 else np.float32
            a = np.frombuffer(bytes(out[off : off + n]), dtype=dtype).astype(np.float32)
            a *= 1 + 0.01 * rng.standard_normal(a.shape).astype(np.float32)
            out[off : off + n] = a.astype(dtype).tobytes()
        path = root / f"{stem}-{name}.tflite"
        path.write_bytes(bytes(out))
        return path

    return {"base": write("base", []), "head": write("head", spans[-1:]), "all": write("all", spans)}


def compiled(src: Path, target: str, calib: Path, out: Path, **kw: object) -> Path:
    from compiler.pipeline import compile_model
    from signing.keys import generate_keypair

    result = compile_model(
        src,
        target=target,
        calib_path=calib,
        out_dir=out,
        release_key=KEY.setdefault("k", generate_keypair()),
        name="bench-delta",
        version="1",
        release=1,
        gate=None,
        latency_repeats=1,
        **kw,  # type: ignore[arg-type]
    )
    return out / result.manifest.model_file.path


KEY: dict[str, KeyPair] = {}
LABELS = {"head": "head-only", "full": "full retrain", "all": "all layers ~1%"}


def run() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    sys.path.insert(0, str(PROJECT / "scripts"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jobs: list[tuple[str, dict[str, Path], str, Path, dict[str, object]]] = []
        digits = digits_variants(root)
        jobs.append(("digits-mlp", digits, "arm64-cpu", root / "digits-calib.npz", {}))
        try:
            import fetch_models

            models = fetch_models.fetch()
        except Exception as exc:  # the registry out of reach: the trained-here model still runs
            rows.append({"bench": "delta real models", "skipped": f"models unavailable: {exc}"})
            models = {}
        if models:
            from compiler.realdata import TEXT_CLS_PREPROCESS, photo_crops, write_text_line_folder
            from compiler.sources import Preprocess

            write_text_line_folder(root / "tc", 64, seed=0)
            text = onnx_variants(models["text_direction_cls"], root, "text-cls")
            jobs.append(
                (
                    "text-cls-mobilenetv3",
                    text,
                    "arm64-cpu",
                    root / "tc",
                    {"preprocess": Preprocess.parse(TEXT_CLS_PREPROCESS)},
                )
            )
            np.savez(root / "hand.npz", x=photo_crops(32, 256, 256, seed=0))
            hand = tflite_variants(models["hand_recrop"], root, "hand-recrop")
            jobs.append(("hand-recrop", hand, "tflite-int8", root / "hand.npz", {}))
            # a larger file for the build/apply costs (float only: its compile is the compiler bench's)
            det = onnx_variants(models["text_detector"], root, "text-det")
            jobs.append(("text-det-dbnet", det, "", root, {}))
        for case, variants, target, calib, kw in jobs:
            built = {
                name: compiled(path, target, calib, root / f"{case}-{name}-{target}", **kw)
                for name, path in variants.items()
                if target
            }
            src_kind = "float " + variants["base"].suffix.lstrip(".")
            out_kind = "int8 " + ("QDQ onnx" if target == "arm64-cpu" else "tflite")
            for change in [v for v in variants if v != "base"]:
                label = f"{case} {LABELS[change]}"
                rows.append(pair_row(label, src_kind, variants["base"], variants[change], root))
                if built:
                    rows.append(pair_row(label, out_kind, built["base"], built[change], root))
    return rows


if __name__ == "__main__":
    _child(sys.argv[1:])

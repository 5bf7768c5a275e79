"""Run a model file on this host, float in and float out, whatever its format.

The evaluation and the latency figures compare a float model with its
quantized twin, which may be ONNX (onnxruntime) or full-int8 TFLite (LiteRT's
``Interpreter`` from ``ai_edge_litert``). A ``Runner`` hides the difference:
``run(feed)`` takes float arrays by input name and returns float arrays in
output order. For an int8-in/int8-out TFLite model the runner quantizes the
inputs and dequantizes the outputs with the scales stored in the model, which
is exactly what an application on the device has to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compiler.signature import IOSignature, TensorSpec
from device_agent.runtime import input_quant_constants, quantize_input


class Runner(Protocol):
    """Float feeds in (by input name), float outputs out (in signature order)."""

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OnnxRunner:
    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._sess.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(r) for r in self._sess.run(self._outputs, feed)]


def _quiet_litert() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class TFLiteRunner:
    """LiteRT interpreter over one signature-less or single-signature model, batch by batch.

    TFLite models have a fixed batch (1 for all real models we saw); a feed
    with more samples is run sample by sample (``resize`` would change the
    kernels the device uses, so we do not).
    """

    def __init__(self, model: Path | bytes, threads: int = 1, *, preserve: bool = False) -> None:
        """``preserve``: keep every intermediate tensor readable after ``run`` (``intermediates``)."""
        _quiet_litert()
        from ai_edge_litert.interpreter import Interpreter

        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        self._it = Interpreter(
            model_content=content, num_threads=threads, experimental_preserve_all_tensors=preserve
        )
        self._it.allocate_tensors()
        self.inputs = self._it.get_input_details()
        self.outputs = self._it.get_output_details()

    def signature(self) -> IOSignature:
        def spec(d: dict[str, Any]) -> TensorSpec:
            return TensorSpec(d["name"], tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]).name)

        return IOSignature(tuple(spec(d) for d in self.inputs), tuple(spec(d) for d in self.outputs))

    def io_quantization(self) -> dict[str, Any]:
        """Scale and zero point of each int8 input/output (what the device app must apply)."""

        def q(d: dict[str, Any]) -> dict[str, Any]:
            scale, zero = d["quantization"]
            return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "scale": scale, "zero_point": zero}

        return {"inputs": [q(d) for d in self.inputs], "outputs": [q(d) for d in self.outputs]}

    def intermediates(self) -> dict[str, np.ndarray]:
        """Every tensor of the last run by name, dequantized to float (needs ``preserve``)."""
        out: dict[str, np.ndarray] = {}
        for d in self._it.get_tensor_details():
            try:
                value = self._it.get_tensor(d["index"])
            except ValueError:  # constants folded away, or not allocated
                continue
            out[d["name"]] = _from_tensor(value, d)
        return out

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feed.values())))
        batch = int(self.inputs[0]["shape"][0]) if len(self.inputs[0]["shape"]) else 1
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, n, max(batch, 1)):
            for d in self.inputs:
                self._it.set_tensor(d["index"], _to_tensor(feed[d["name"]][start : start + batch], d))
            self._it.invoke()
            for part, d in zip(parts, self.outputs, strict=True):
                part.append(_from_tensor(self._it.get_tensor(d["index"]), d))
        return [np.concatenate(p, axis=0) for p in parts]


def _to_tensor(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu" and np.asarray(x).dtype.kind == "f":
        scale, zero = detail["quantization"]
        return quantize_input(x, input_quant_constants(scale, zero, dtype), dtype)
    return np.asarray(x, dtype=dtype)


def _from_tensor(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu":
        scale, zero = detail["quantization"]
        if scale:
            return ((x.astype(np.float32) - zero) * np.float32(scale)).astype(np.float32)
    return np.array(x, copy=True)


def open_runner(path: Path | bytes, fmt: str, threads: int = 1) -> Runner:
    """``fmt`` is ``onnx`` or ``tflite``."""
    if fmt == "onnx":
        assert not isinstance(path, bytes)
        return OnnxRunner(path, threads)
    return TFLiteRunner(path, threads)


def median_latency_ms(runner: Runner, feed: dict[str, np.ndarray], repeats: int) -> float:
    """Median wall time of ``repeats`` single-sample runs after one warm-up run."""
    import time

    one = {k: v[:1] for k, v in feed.items()}
    runner.run(one)
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(one)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 4)


def latency(
    fp32: tuple[Path | bytes, str], int8: tuple[Path | bytes, str], feed: dict[str, np.ndarray], repeats: int
) -> dict[str, Any]:
    """Host latency, median of ``repeats`` single-sample runs, with 1 and 2 threads, fp32 vs int8."""
    out: dict[str, Any] = {"repeats": repeats, "note": "this host, batch 1; not the device"}
    threads: Sequence[int] = (1, 2)
    for t in threads:
        a = median_latency_ms(open_runner(*fp32, threads=t), feed, repeats)
        b = median_latency_ms(open_runner(*int8, threads=t), feed, repeats)
        out[f"threads_{t}"] = {"fp32_ms": a, "int8_ms": b, "ratio": round(b / a, 3) if a else None}
    return out

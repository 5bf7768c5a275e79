"""A small real model trained here, for the end-to-end demo and the tests.

scikit-learn ships the 8x8 digits data set (no download), and a one-hidden-
layer MLP trains on it in well under a second to > 0.9 test accuracy. The
ONNX graph is written with ``onnx.helper`` from the trained weights rather
than skl2onnx: that gives exactly the signature the demo relies on (one
float32 input ``input`` [N, 64] scaled to 0..1, one float32 output ``scores``
[N, 10] of logits) with no ZipMap and no int64 label output.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"
OUTPUT_NAME = "scores"
OPSET = 13
N_FEATURES = 64
N_CLASSES = 10


@dataclass(frozen=True)
class DigitsExample:
    """Paths written by ``train_digits`` and the float model's test accuracy (sklearn)."""

    model_path: Path
    calib_path: Path
    eval_path: Path
    accuracy: float
    n_calib: int
    n_eval: int


def train_digits(out_dir: Path, *, hidden: int = 32, seed: int = 0) -> DigitsExample:
    """Train an MLP on sklearn's digits; write ``digits.onnx``, ``calib.npz`` (x) and ``eval.npz`` (x, y).

    The evaluation samples are the held-out test split: never trained on and
    not in the calibration set, so the report measures generalisation.
    """
    trained = _trained_digits(hidden, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "digits.onnx"
    model_path.write_bytes(trained.model)
    calib_path, eval_path = out_dir / "calib.npz", out_dir / "eval.npz"
    np.savez(calib_path, x=trained.calib)
    np.savez(eval_path, x=trained.x_test, y=trained.y_test)
    return DigitsExample(
        model_path, calib_path, eval_path, trained.accuracy, len(trained.calib), len(trained.x_test)
    )


@dataclass(frozen=True)
class _TrainedDigits:
    model: bytes  # the serialised ONNX model
    calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    accuracy: float


@functools.lru_cache(maxsize=4)
def _trained_digits(hidden: int, seed: int) -> _TrainedDigits:
    """The training itself, once per process for each (hidden, seed): it is deterministic, costs
    about a second of CPU, and a process that builds the example again and again (the scenario
    harness, run after run; a test session) would otherwise repeat it every time. The arrays are
    read-only: every caller gets the same ones, and writes them to its own files."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    accuracy = float(clf.score(x_test, y_test))
    model = _mlp_to_onnx(clf.coefs_, clf.intercepts_).SerializeToString()
    calib = x_train[np.random.default_rng(seed).permutation(len(x_train))[:400]]
    for array in (calib, x_test, y_test):
        array.setflags(write=False)
    return _TrainedDigits(model, calib, x_test, y_test, accuracy)


def _mlp_to_onnx(coefs: list[np.ndarray], intercepts: list[np.ndarray]) -> onnx.ModelProto:
    """Gemm/Relu chain from sklearn's weights; the last layer emits logits (argmax = predict)."""
    nodes, inits = [], []
    current = INPUT_NAME
    for i, (w, b) in enumerate(zip(coefs, intercepts, strict=True)):
        last = i == len(coefs) - 1
        out = OUTPUT_NAME if last else f"h{i}"
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"W{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"B{i}"),
        ]
        gemm_out = out if last else f"{out}_pre"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [gemm_out], name=f"dense{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [out], name=f"relu{i}"))
        current = out
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", N_CLASSES])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgefleet"
    )
    onnx.checker.check_model(model)
    return model


def make_nan_model(src: Path, dst: Path, output: str = OUTPUT_NAME) -> Path:
    """Copy ``src`` so that ``output`` is all NaN, keeping the io signature.

    The demo compiles this with ``gate=None`` and rolls it out, to show that
    the fleet's health gates (not only the compiler's) catch a broken model.
    """
    model = onnx.load(str(src))
    graph = model.graph
    if output not in {o.name for o in graph.output}:
        raise ValueError(f"{src}: no output named {output!r}")
    hidden = f"{output}_before_nan"
    for node in graph.node:
        node.output[:] = [hidden if o == output else o for o in node.output]
        node.input[:] = [hidden if i == output else i for i in node.input]
    graph.initializer.append(numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "nan_constant"))
    graph.node.append(helper.make_node("Mul", [hidden, "nan_constant"], [output], name="poison_nan"))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)

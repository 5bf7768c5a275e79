"""The demo's subtly worse model: about 5 points less accurate on the held-out digits, with the
same graph (so the same latency) and finite outputs, so only labels can tell it apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from compiler.examples import train_digits
from edgefleet.demo import ACCURACY_LOSS, _make_worse_model


def _scores(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_the_worse_model_loses_about_five_points_and_nothing_else_shows(tmp_path: Path) -> None:
    example = train_digits(tmp_path / "digits")
    worse = tmp_path / "worse.onnx"
    got = _make_worse_model(example.model_path, worse, example.eval_path, ACCURACY_LOSS)
    held_out = np.load(example.eval_path)
    x, y = held_out["x"].astype(np.float32), held_out["y"]
    good_scores, worse_scores = _scores(example.model_path, x), _scores(worse, x)
    good_acc = float((good_scores.argmax(1) == y).mean())
    assert got == float((worse_scores.argmax(1) == y).mean())
    assert ACCURACY_LOSS <= good_acc - got <= ACCURACY_LOSS + 0.03
    assert np.isfinite(worse_scores).all()
    a, b = onnx.load(str(example.model_path)).graph, onnx.load(str(worse)).graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in b.node
    ]
    assert [tuple(t.dims) for t in a.initializer] == [tuple(t.dims) for t in b.initializer]
    # seeded: the demo rolls out the same model every time
    again = tmp_path / "again.onnx"
    _make_worse_model(example.model_path, again, example.eval_path, ACCURACY_LOSS)
    assert again.read_bytes() == worse.read_bytes()

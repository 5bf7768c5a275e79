"""LiteRT backend chosen by bundle target, NPU targets refused clearly, and the local inference API."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.local_api import unix_request
from device_agent.runtime import AutoRuntimeFactory, LiteRtFactory, UnsupportedTarget
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    LoopThread,
    Observer,
    X,
    agent_config,
    make_bundle,
    sign_directive,
    start_agent,
    unique_id,
)
from .tflite_models import make_tflite

DS = protocol.DeploymentState
REPO = Path(__file__).resolve().parents[2]
TARGETS = ["arm64-cpu", "tflite-int8", "ethos-u55-128"]


def _post(url: str, body: bytes, ctype: str = "application/json") -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_litert_runs_tflite_and_npu_without_delegate_is_refused(tmp_path: Path) -> None:
    path = make_tflite(tmp_path / "m.tflite", seed=3)
    factory = AutoRuntimeFactory()
    assert factory.supports("tflite-int8") and not factory.supports("ethos-u55-128")
    assert "NPU" in factory.unsupported_reason("ethos-u55-128")
    model = factory.load(path, "x" * 64)
    out = model.run(X)[0]
    w = np.random.default_rng(3).standard_normal((10, 64)).astype(np.float32)
    np.testing.assert_allclose(out, X @ w.T, rtol=1e-4, atol=1e-4)
    assert model.run(np.vstack([X, X]))[0].shape == (2, 10)  # batch resize
    with pytest.raises(UnsupportedTarget, match="no NPU delegate"):
        LiteRtFactory().load(path, "x" * 64, target="ethos-u55-128")


def test_agent_serves_tflite_bundle_and_api_names_the_version(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    dev = unique_id()
    fleet, release = keydir.key("fleet"), keydir.key("release")
    tfl = make_bundle(tmp_path, release, seed=3, target="tflite-int8", version="7")
    npu = make_bundle(tmp_path, release, seed=4, target="ethos-u55-128", version="8")
    artifacts.add(tfl)
    artifacts.add(npu)
    cfg = agent_config(
        broker_info, tmp_path / dev, keydir.trust_path, dev, targets=TARGETS, api_listen="127.0.0.1:0"
    )
    agent = start_agent(loop_thread, Agent(cfg, keydir.trust_root()))
    try:
        api = agent.api.address
        status, doc = _post(f"{api}/v1/infer", json.dumps({"inputs": X.tolist()}).encode())
        assert status == 503 and doc["error"]["code"] == "no_model"
        observer.publish(dev, sign_directive(fleet, dev, 1, artifacts.model_ref(tfl)))
        observer.wait_event(dev, DS.SERVING, seq=1)
        status, doc = _post(f"{api}/v1/infer", json.dumps({"inputs": X.tolist()}).encode())
        assert status == 200 and doc["ok"], doc
        assert doc["model_sha256"] == tfl.sha256 and doc["model_version"] == "7"
        np.testing.assert_allclose(doc["outputs"][0], agent.infer(X).outputs[0].tolist(), rtol=1e-5)
        buf = io.BytesIO()
        np.save(buf, X)
        status, doc = _post(f"{api}/v1/infer", buf.getvalue(), "application/x-npy")
        assert status == 200 and doc["model_version"] == "7"
        # bad input: clear 400s, and the agent keeps serving
        for body, ctype, code in [
            (b"{not json", "application/json", "bad_json"),
            (b'{"x": 1}', "application/json", "missing_inputs"),
            (b'{"inputs": [[1, 2], [3]]}', "application/json", "bad_inputs"),
            (json.dumps({"inputs": [[1.0] * 63]}).encode(), "application/json", "inference_failed"),
            (b"garbage", "application/x-npy", "bad_npy"),
        ]:
            status, doc = _post(f"{api}/v1/infer", body, ctype)
            assert status == 400 and doc["error"]["code"] == code, (code, doc)
        with urllib.request.urlopen(f"{api}/v1/model", timeout=5) as resp:
            info = json.loads(resp.read())
        assert info["model_version"] == "7" and info["input_shape"] == [1, 64]
        # an NPU bundle on a device without the delegate: refused with the reason, old model kept
        observer.publish(dev, sign_directive(fleet, dev, 2, artifacts.model_ref(npu)))
        ev = observer.wait_event(dev, DS.FAILED, seq=2)
        assert ev.reason == "unsupported_target" and "NPU" in (ev.detail or "")
        assert agent.infer(X).model_sha256 == tfl.sha256
        caps = agent.reported().capabilities
        assert "litert" in caps["runtimes"] and "onnxruntime" in caps["runtimes"]
        assert caps["runnable_targets"] == ["arm64-cpu", "tflite-int8"] and caps["disk_free"] > 0
    finally:
        loop_thread.run(agent.stop())


def test_api_over_unix_socket(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    dev = unique_id()
    bundle = make_bundle(tmp_path, keydir.key("release"), seed=5)
    artifacts.add(bundle)
    sock = tmp_path / "run" / "agent.sock"
    cfg = agent_config(broker_info, tmp_path / dev, keydir.trust_path, dev, api_listen=f"unix:{sock}")
    agent = start_agent(loop_thread, Agent(cfg, keydir.trust_root()))
    try:
        observer.publish(dev, sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle)))
        observer.wait_event(dev, DS.SERVING, seq=1)
        status, doc = unix_request(
            str(sock), "POST", "/v1/infer", json.dumps({"inputs": X.tolist()}).encode(), "application/json"
        )
        assert status == 200 and doc["model_sha256"] == bundle.sha256 and doc["model_version"] == "1"
        assert unix_request(str(sock), "GET", "/healthz") == (200, {"status": "ok"})
        # the documented example client, as an application would run it
        out = subprocess.run(
            [sys.executable, str(REPO / "examples" / "agent_client.py"), f"unix:{sock}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert f"answered by 1 {bundle.sha256[:12]} ok True" in out
        assert " matched" in out.splitlines()[-1]  # and its label was joined to the prediction
    finally:
        loop_thread.run(agent.stop())
    assert not sock.exists()


class _FakeInt8Interpreter:
    """Just enough of a TFLite interpreter for a full-int8 model: identity on the int8 tensor."""

    def __init__(self, in_q: tuple[float, int], out_q: tuple[float, int]) -> None:
        self.in_q, self.out_q = in_q, out_q
        self.tensor = np.zeros((1, 64), dtype=np.int8)

    def get_input_details(self) -> list[dict[str, Any]]:
        return [
            {"index": 0, "name": "x", "shape": np.array([1, 64]), "dtype": np.int8, "quantization": self.in_q}
        ]

    def get_output_details(self) -> list[dict[str, Any]]:
        return [
            {
                "index": 1,
                "name": "y",
                "shape": np.array([1, 64]),
                "dtype": np.int8,
                "quantization": self.out_q,
            }
        ]

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        assert index == 0 and value.dtype == np.int8
        self.tensor = value.copy()

    def invoke(self) -> None:
        pass

    def get_tensor(self, index: int) -> np.ndarray:
        return self.tensor.copy()


def test_int8_quantize_and_dequantize_match_the_reference_formula() -> None:
    """The fast paths (float32 constants, clip ufunc, 256-entry table) compute what the textbook does."""
    from device_agent.runtime import TfliteModel

    in_q, out_q = (0.0281, 11), (0.191, -3)
    model = TfliteModel(_FakeInt8Interpreter(in_q, out_q), "0" * 64, "fake")
    assert model.input_dtype == np.float32
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32) * 3  # some values clip
    x[0, :4] = np.array([100.0, -100.0, 0.0, 0.5 * in_q[0]], dtype=np.float32)
    q_ref = np.clip(np.round(x / np.float32(in_q[0])) + in_q[1], -128, 127).astype(np.int8)
    got_q = model._prepare(x)
    assert got_q.dtype == np.int8 and np.abs(got_q.astype(int) - q_ref.astype(int)).max() <= 1  # ties
    (out,) = model.run(x)
    expected = (got_q.astype(np.float32) - np.float32(out_q[1])) * np.float32(out_q[0])
    assert out.dtype == np.float32 and np.array_equal(out, expected)
    # int8 inputs pass through untouched
    raw = np.arange(-32, 32, dtype=np.int8).reshape(1, 64)
    assert np.array_equal(model._prepare(raw), raw)


def test_the_compilers_evaluation_feeds_the_integers_a_device_feeds() -> None:
    """MediaPipe-style inputs (pixel / 127.5 - 1) sit on half quantization steps, where float32
    ``x * (1/scale)`` and float64 ``x / scale`` round apart: the gate must judge what devices run."""
    from compiler.runners import _to_tensor
    from device_agent.runtime import TfliteModel

    scale, zero = 1 / 127.5, -1
    model = TfliteModel(_FakeInt8Interpreter((scale, zero), (0.1, 0)), "0" * 64, "fake")
    pixels = np.arange(64, dtype=np.float32).reshape(1, 64) * 4
    x = pixels / np.float32(127.5) - np.float32(1.0)
    device = model._prepare(x)
    detail = {"dtype": np.int8, "quantization": (scale, zero)}
    assert np.array_equal(_to_tensor(x, detail), device)
    float64_way = np.clip(np.round(x.astype(np.float64) / scale) + zero, -128, 127).astype(np.int8)
    assert not np.array_equal(float64_way, device)  # the two ways really differ on these inputs

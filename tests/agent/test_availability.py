"""Availability and cost in a real agent's telemetry: the local API's requests and the errors that left
them without a prediction (a hung model call answers ``timeout``), feature availability per input
(NaN, missing, outside the calibration range the compiler signed into the manifest), and the agent
process's CPU time shared among its models.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compiler.examples import train_digits
from compiler.pipeline import compile_model
from device_agent.input_checks import MAX_BUCKET_VALUES, InputCheck
from device_agent.runtime import LoadedModel, OnnxRuntimeFactory
from device_agent.telemetry import _Stats, share_cpu
from device_agent.wire import INPUT_BUCKETS
from signing.keyring import KeyDir

from .field_device import FieldDevice, ranged_bundle, start_device
from .harness import Bundle, LoopThread, make_bundle, wait_for

STALL = 123.0  # an input whose first value is this hangs the model call until released


class _StallingModel:
    """A real onnxruntime model whose ``run`` hangs on the STALL input, as a wedged accelerator would."""

    def __init__(self, inner: LoadedModel, release: threading.Event) -> None:
        self.inner, self.release = inner, release
        self.sha256, self.input_name = inner.sha256, inner.input_name
        self.input_shape, self.input_dtype = inner.input_shape, inner.input_dtype

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        if x.size and float(np.asarray(x).flat[0]) == STALL:
            self.release.wait(30)
        return self.inner.run(x)


class StallingRuntime:
    def __init__(self) -> None:
        self.inner = OnnxRuntimeFactory()
        self.release = threading.Event()

    def supports(self, target: str) -> bool:
        return self.inner.supports(target)

    def load(self, path: Path, sha256: str) -> LoadedModel:
        return _StallingModel(self.inner.load(path, sha256), self.release)


@pytest.fixture
def stalling() -> Iterator[StallingRuntime]:
    runtime = StallingRuntime()
    yield runtime
    runtime.release.set()


def _post(dev: FieldDevice, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    host, port = dev.agent.api.address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _inputs(value: float, width: int = 64) -> bytes:
    return json.dumps({"inputs": [[value] * width]}).encode()


def test_local_api_requests_and_what_left_them_without_a_prediction(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, stalling: StallingRuntime
) -> None:
    dev = start_device(
        keydir,
        tmp_path / "dev",
        loop_thread,
        runtime_factory=stalling,
        api_listen="127.0.0.1:0",
        api_request_timeout_s=0.3,
        sketch_every=1,
    )
    try:
        bundle = ranged_bundle(tmp_path, keydir, lo=-1.0, hi=1.0)
        dev.serve(bundle)
        assert [_post(dev, _inputs(0.5))[0] for _ in range(3)] == [200] * 3
        status, doc = _post(dev, _inputs(float("nan")))  # JSON's NaN: the model answers NaN
        assert status == 200 and doc["error"] == "non_finite" and not doc["ok"]
        assert _post(dev, b"{broken")[0] == 400  # bad_input, and the input is missing
        assert _post(dev, b'{"values": [1]}')[1]["error"]["code"] == "missing_inputs"
        status, doc = _post(dev, _inputs(0.5, width=63))  # misshapen: the model refuses it
        assert (status, doc["error"]["code"]) == (400, "inference_failed")
        status, doc = _post(dev, _inputs(STALL))
        assert (status, doc["error"]["code"]) == (504, "timeout")
        stalling.release.set()
        assert _post(dev, _inputs(5.0))[0] == 200  # outside the calibration range, still answered
        wait_for(lambda: dev.agent.served_ok.get(bundle.sha256) == 5, what="the stalled call to finish")

        stats = dev.stats(bundle.sha256)
        assert stats["requests"] == 9
        assert stats["request_errors"] == {"non_finite": 1, "bad_input": 2, "runtime_error": 1, "timeout": 1}
        # Every inference is checked (sketch_every=1): 3 fine, NaN, misshapen, the stalled one (it
        # ran to the end after its timeout) and the last one, both out of range; plus the two
        # requests with no input.
        checked, nan, missing, outside = stats["input_checks"]["input"]
        assert (nan, missing, outside) == (1, 3, 2)
        assert checked == 9
    finally:
        loop_thread.run(dev.agent.stop())


def test_input_checks_are_sampled_like_the_drift_sketches(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread
) -> None:
    dev = start_device(keydir, tmp_path / "dev", loop_thread, sketch_every=4)
    try:
        bundle = ranged_bundle(tmp_path, keydir, lo=-1.0, hi=1.0)
        dev.serve(bundle)
        bad = np.full((1, 64), 3.0, np.float32)
        for _ in range(40):
            dev.agent.infer(bad)
        checked, nan, missing, outside = dev.stats(bundle.sha256)["input_checks"]["input"]
        assert checked == 10 and outside == 10 and nan == missing == 0
        # the distribution rides on the same sample: 10 requests x 64 values, all above the range
        assert dev.stats(bundle.sha256)["input_buckets"]["input"] == [0] * 11 + [640]
    finally:
        loop_thread.run(dev.agent.stop())


def test_the_calibration_range_comes_from_the_compiled_bundle(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread
) -> None:
    """The compiler signs each input's calibration range into the manifest; the device reads it there."""
    ex = train_digits(tmp_path / "digits")
    result = compile_model(
        ex.model_path,
        target="arm64-cpu",
        calib_path=ex.calib_path,
        eval_path=ex.eval_path,
        out_dir=tmp_path / "bundle",
        release_key=keydir.key("release"),
        name="digits",
        version="1",
        release=1,
    )
    calib = np.load(ex.calib_path)["x"]
    ranges = result.manifest.quantization["input_ranges"]
    assert ranges == {"input": {"min": float(calib.min()), "max": float(calib.max())}}
    entry = result.manifest.model_file
    bundle = Bundle(result.bundle_dir, entry.sha256, entry.length, "digits", "1", "arm64-cpu")
    dev = start_device(keydir, tmp_path / "dev", loop_thread, sketch_every=1)
    try:
        dev.serve(bundle)
        samples = np.load(ex.eval_path)["x"][:20].astype(np.float32)
        for row in samples:
            assert dev.agent.infer(row[None, :]).ok
        dev.agent.infer(samples[:1] * 0 + ranges["input"]["max"] + 1.0)
        dev.agent.infer(samples[:1] * 0 + ranges["input"]["min"] - 1.0)
        checked, nan, missing, outside = dev.stats(bundle.sha256)["input_checks"]["input"]
        assert (checked, nan, missing, outside) == (22, 0, 0, 2)
    finally:
        loop_thread.run(dev.agent.stop())


def test_cpu_time_is_shared_by_inferences_and_read_once_per_window(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread
) -> None:
    window = {"a": _Stats(inferences=30), "b": _Stats(inferences=10), "c": _Stats(labels=4)}
    share_cpu(window, 80.0)
    assert (window["a"].cpu_ms, window["b"].cpu_ms, window["c"].cpu_ms) == (60.0, 20.0, 0.0)
    share_cpu({"idle": _Stats(labels=1)}, 5.0)  # no inferences: nobody's

    dev = start_device(keydir, tmp_path / "dev", loop_thread)
    reads: list[float] = []
    clock = dev.agent.telemetry.cpu_clock

    def counting() -> float:
        reads.append(clock())
        return reads[-1]

    dev.agent.telemetry.cpu_clock = counting
    try:
        bundle = make_bundle(tmp_path / "b", keydir.key("release"), seed=1)
        dev.serve(bundle)
        x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        dev.batches()  # a window boundary
        reads.clear()
        for _ in range(2000):
            dev.agent.infer(x)
        stats = dev.batches()[-1].models[bundle.sha256]
        assert len(reads) == 1  # once per window, never per inference
        assert stats.inferences == 2000 and stats.cpu_ms > 0
    finally:
        loop_thread.run(dev.agent.stop())


def test_the_input_check_reads_the_manifest_and_forgives_a_renamed_tensor() -> None:
    manifest = {
        "io_signature": {"inputs": [{"name": "pixels", "shape": ["N", 8, 8], "dtype": "float32"}]},
        "quantization": {"input_ranges": {"pixels": {"min": 0.0, "max": 1.0}}},
    }
    # A converter renamed the tensor ("serving_default_pixels:0"): one input on each side is the same.
    check = InputCheck.from_manifest("serving_default_pixels:0", manifest)
    assert check == InputCheck("pixels", (None, 8, 8), 0.0, 1.0)
    ok = np.zeros((3, 8, 8), np.float32)
    assert check(ok) == (False, False, False)
    assert check(ok + 2) == (False, False, True)
    nan = ok.copy()
    nan[0, 0, 0] = np.nan
    assert check(nan) == (True, False, False)
    all_nan = np.full((1, 8, 8), np.nan, np.float32)
    assert check(all_nan) == (True, False, False)
    for bad in (np.zeros((1, 8, 7), np.float32), np.zeros((1, 64), np.float32), np.zeros(0), "text", None):
        assert check(bad) == (False, True, False)
    bare = InputCheck.from_manifest("x", None)  # no manifest fields: NaN only
    assert bare == InputCheck("x") and bare(ok + 5) == (False, False, False)


def test_input_values_are_counted_per_bucket_of_the_calibration_range() -> None:
    check = InputCheck("x", None, -1.0, 1.0)
    assert (INPUT_BUCKETS[0], INPUT_BUCKETS[1], INPUT_BUCKETS[-1]) == ("00 <min", "01 0-10%", "11 >max")
    # dashboards sort the bars by name
    assert sorted(INPUT_BUCKETS) == list(INPUT_BUCKETS) and len(INPUT_BUCKETS) == 12
    x = np.array([[-5.0, -1.0, -0.95, -0.7, 0.0, 0.05, 0.99, 1.0, 1.01, np.inf, -np.inf, np.nan]])
    got = check.buckets(x)
    assert got is not None
    # below: -5, -inf | bin 0 [-1, -0.8): -1, -0.95 | bin 1: -0.7 | bin 5 [0, 0.2): 0, 0.05 |
    # bin 9 [0.8, 1]: 0.99 and the maximum itself | above: 1.01, +inf | NaN: not counted
    assert got.tolist() == [2, 2, 1, 0, 0, 0, 2, 0, 0, 0, 2, 2]
    ints = check.buckets(np.array([[-3, 0, 1, 7]], np.int8))
    assert ints is not None and ints.tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1]
    # a large tensor is read with a stride: a bounded number of values, the same distribution
    big = np.tile(np.array([-2.0, 0.5, 0.5], np.float32), 40_000)[None, :]
    counted = check.buckets(big)
    assert counted is not None and 1000 <= counted.sum() <= MAX_BUCKET_VALUES
    assert counted[0] + counted[8] == counted.sum() and abs(counted[8] - 2 * counted[0]) <= 2
    # no range (or an empty one), or nothing numeric: no distribution
    assert InputCheck("x").buckets(x) is None and InputCheck("x", None, 1.0, 1.0).buckets(x) is None
    assert check.buckets(np.zeros(0, np.float32)) is None and check.buckets("text") is None


@pytest.mark.slow
def test_the_local_api_serves_the_agents_counters_to_prometheus(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.ops.tools import tool

    dev = start_device(keydir, tmp_path / "dev", loop_thread, api_listen="127.0.0.1:0")
    try:
        bundle = ranged_bundle(tmp_path, keydir, lo=-1.0, hi=1.0)
        dev.serve(bundle)
        assert _post(dev, _inputs(0.5))[0] == 200
        host, port = dev.agent.api.address.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
    finally:
        loop_thread.run(dev.agent.stop())
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("edgefleet_agent_events_total", (("event", "swaps"),))] >= 1
    assert samples[("edgefleet_agent_deployment_state", (("state", "serving"),))] == 1
    assert samples[("edgefleet_agent_model_info", (("sha256", bundle.sha256), ("version", "1")))] == 1
    lint = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

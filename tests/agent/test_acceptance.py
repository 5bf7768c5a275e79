"""On-device acceptance: the bundle's signed golden set run on the device's own runtime before the swap.

The pure verdict is tested on its own; then a real compiled bundle (digits, through the
compiler's gate) goes through the real agent shell (in-memory link and fetcher, real
onnxruntime) twice: on the plain runtime it is accepted, and on a runtime whose delegate
computes differently -- still inside the host gate's absolute thresholds, as an x86 CPU
without VNNI was (39.6 -> 22.8 dB) -- it is refused with ``acceptance_failed`` and its
figures, and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compiler import Gate, compile_model
from compiler.examples import train_digits
from device_agent import acceptance, protocol
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.memory_link import MemoryLink
from device_agent.runtime import LoadedModel, OnnxModel, OnnxRuntimeFactory
from signing.errors import DigestMismatch
from signing.keyring import KeyDir
from signing.manifest import verify_bundle
from tests.support.debian import apt_install

from .harness import HW, Bundle, LoopThread, X, make_bundle, model_ref, sign_directive, unique_id, wait_for
from .memory_fetcher import MemoryFetcher

DS = protocol.DeploymentState


# -- the pure core ---------------------------------------------------------------------------------


def _manifest(
    checks: list[dict[str, Any]], files: tuple[str, ...] = ("m.onnx", "golden.npz")
) -> dict[str, Any]:
    return {
        "files": [{"path": f, "sha256": "0" * 64, "length": 1} for f in files],
        "quantization": {
            "acceptance": {
                "file": "golden.npz",
                "samples": 4,
                "outputs": {"y": {"kind": "regression", "params": {}}},
                "checks": checks,
            }
        },
    }


SNR = {"output": "y", "figure": "snr_db", "compiled": 40.0, "tolerance": 3.0, "bound": "min"}


def test_a_figure_is_held_to_compiled_minus_tolerance() -> None:
    spec = acceptance.Spec.from_manifest(_manifest([SNR]))
    assert spec is not None
    assert acceptance.judge(spec, {"y": {"snr_db": 37.0}}).passed
    refused = acceptance.judge(spec, {"y": {"snr_db": 36.9}})
    assert not refused.passed
    assert refused.checks[0]["limit"] == 37.0 and "y.snr_db 36.9" in refused.detail
    # not measurable (NaN outputs) or missing: refused, never passed
    assert not acceptance.judge(spec, {"y": {"snr_db": None}}).passed
    assert not acceptance.judge(spec, {"y": {"snr_db": float("nan")}}).passed
    assert not acceptance.judge(spec, {}).passed


def test_a_lower_is_better_figure_may_rise_by_the_tolerance_only() -> None:
    step = {"output": "y", "figure": "step_error", "compiled": 0.1, "tolerance": 0.05, "bound": "max"}
    spec = acceptance.Spec.from_manifest(_manifest([step]))
    assert spec is not None
    assert acceptance.judge(spec, {"y": {"step_error": 0.15}}).passed
    assert not acceptance.judge(spec, {"y": {"step_error": 0.16}}).passed


def test_a_manifest_without_a_golden_set_is_not_checked_and_a_bad_one_is_refused() -> None:
    assert acceptance.Spec.from_manifest({"files": [], "quantization": {}}) is None
    with pytest.raises(acceptance.MalformedAcceptance, match="not among the manifest's signed files"):
        acceptance.Spec.from_manifest(_manifest([SNR], files=("m.onnx",)))
    with pytest.raises(acceptance.MalformedAcceptance, match="malformed"):
        acceptance.Spec.from_manifest(_manifest([{"output": "y"}]))
    with pytest.raises(acceptance.MalformedAcceptance, match="unknown outputs"):
        acceptance.Spec.from_manifest(_manifest([{**SNR, "output": "z"}]))


def test_a_golden_file_with_other_samples_than_its_spec_is_refused() -> None:
    spec = acceptance.Spec.from_manifest(_manifest([SNR]))
    assert spec is not None
    buf = io.BytesIO()
    np.savez(buf, **{"input": np.zeros((3, 2)), "ref:y": np.zeros((3, 2))})
    with pytest.raises(acceptance.MalformedAcceptance, match="4 samples"):
        acceptance.Golden.parse(buf.getvalue(), spec)
    with pytest.raises(acceptance.MalformedAcceptance, match="unreadable"):
        acceptance.Golden.parse(b"not an npz", spec)


# -- a compiled bundle through the real shell ------------------------------------------------------


@pytest.fixture(scope="module")
def digits_bundle(
    tmp_path_factory: pytest.TempPathFactory, keydir_module: KeyDir
) -> tuple[Bundle, dict[str, Any]]:
    """digits compiled for arm64-cpu, its scores judged as regression (SNR/cosine, like the x86 case)."""
    pytest.importorskip(
        "sklearn", reason="compiling needs the compiler extra (the arm64 lane has the agent's)"
    )
    root = tmp_path_factory.mktemp("digits-acceptance")
    ex = train_digits(root / "ex")
    result = compile_model(
        ex.model_path,
        target="arm64-cpu",
        calib_path=ex.calib_path,
        eval_path=ex.eval_path,
        out_dir=root / "bundle",
        release_key=keydir_module.key("release"),
        name="digits",
        version="2",
        release=2,
        hardware_ids=[HW],
        latency_repeats=0,
        mixed_precision_seconds=0,
        output_kinds="scores=regression",
    )
    m = result.manifest
    bundle = Bundle(result.bundle_dir, m.model_file.sha256, m.model_file.length, m.name, m.version, m.target)
    return bundle, result.report


@pytest.fixture(scope="module")
def keydir_module(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    from signing.keyring import init_keys

    path = tmp_path_factory.mktemp("acceptance-keys") / "keys"
    init_keys(path)
    return KeyDir(path)


def test_the_bundle_carries_a_bounded_signed_golden_set(digits_bundle: tuple[Bundle, dict[str, Any]]) -> None:
    bundle, report = digits_bundle
    section = report["acceptance"]
    golden = bundle.dir / section["file"]
    assert golden.is_file() and golden.stat().st_size == section["bytes"]
    assert section["bytes"] <= max(64 * 1024, 0.05 * bundle.length)
    assert 4 <= section["samples"] <= 32
    figures = {c["figure"] for c in section["checks"]}
    assert figures == {"snr_db", "cosine_mean"}


def test_the_golden_set_is_covered_by_the_signature(
    digits_bundle: tuple[Bundle, dict[str, Any]], keydir_module: KeyDir, tmp_path: Path
) -> None:
    import shutil

    bundle, report = digits_bundle
    trusted = keydir_module.trust_root().release_keys
    manifest = verify_bundle(bundle.dir, trusted)
    assert [f.path for f in manifest.files] == ["model.onnx", report["acceptance"]["file"], "report.html"]
    copy = tmp_path / "tampered"
    shutil.copytree(bundle.dir, copy)
    golden = copy / report["acceptance"]["file"]
    data = bytearray(golden.read_bytes())
    data[-30] ^= 0xFF
    golden.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        verify_bundle(copy, trusted)


class PerturbedModel:
    """The real model behind a delegate that adds its own error (seeded) at ``snr_db``."""

    def __init__(self, inner: LoadedModel, snr_db: float) -> None:
        self.inner, self.scale = inner, 10 ** (-snr_db / 20)
        self.sha256, self.input_name = inner.sha256, inner.input_name
        self.input_shape, self.input_dtype = inner.input_shape, inner.input_dtype

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        rng = np.random.default_rng(int(np.abs(np.asarray(x)).sum() * 1000) % 2**32)
        outs = self.inner.run(x)
        return [
            o + self.scale * float(np.sqrt((o**2).mean())) * rng.standard_normal(o.shape).astype(o.dtype)
            for o in outs
        ]


class ReferenceFactory(OnnxRuntimeFactory):
    """onnxruntime computing the QDQ reference semantics (graph optimizations off), as the ARM
    kernels do for this model (docs/benchmarks.md): the same numerics on any x86 host running the
    tests, with or without VNNI (the agent's default runtime on an AVX2-only host saturates)."""

    def load(self, path: Path, sha256: str) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        return OnnxModel(session, sha256)


class PerturbedFactory(ReferenceFactory):
    """onnxruntime, with the perturbing delegate for one model (``sha256``)."""

    def __init__(self, sha256: str, snr_db: float) -> None:
        super().__init__()
        self.sha256, self.snr_db = sha256, snr_db

    def load(self, path: Path, sha256: str) -> Any:
        model = super().load(path, sha256)
        return PerturbedModel(model, self.snr_db) if sha256 == self.sha256 else model


@dataclass
class Device:
    agent: Agent
    link: MemoryLink
    fetcher: MemoryFetcher

    def direct(self, keydir: KeyDir, seq: int, bundle: Bundle) -> None:
        model_url, envelope_url = self.fetcher.add(bundle)
        ref = model_ref(bundle, model_url=model_url, envelope_url=envelope_url)
        self.link.deliver(sign_directive(keydir.key("fleet"), self.agent.device_id, seq, ref))

    def events(self) -> list[protocol.Event]:
        return [protocol.decode_event(m.payload) for m in self.link.published(protocol.Channel.EVENTS)]

    def wait_end(self, seq: int) -> protocol.Event:
        def find() -> protocol.Event | None:
            return next(
                (e for e in self.events() if e.seq == seq and e.state in (DS.SERVING, DS.FAILED)), None
            )

        return wait_for(find, 20, f"the end of seq {seq}")

    def reported(self) -> protocol.Reported:
        return protocol.decode_reported(self.link.published(protocol.Channel.REPORTED)[-1].payload)


@pytest.fixture
def device(keydir_module: KeyDir, tmp_path: Path, loop_thread: LoopThread) -> Iterator[Any]:
    started: list[Agent] = []

    def make(runtime: OnnxRuntimeFactory, dev: str | None = None, admission: Any = None) -> Device:
        """A running agent; ``dev``: an earlier one's id, to restart on its data directory;
        ``admission``: its turns at the heavy steps (``device_agent.ports.Admission``)."""
        dev = dev or unique_id()
        cfg = AgentConfig(dev, HW, tmp_path / dev, keydir_module.trust_path, telemetry_interval=0.2)
        link, fetcher = MemoryLink(dev), MemoryFetcher()
        agent = Agent(
            cfg, keydir_module.trust_root(), runtime, link=link, fetcher=fetcher, admission=admission
        )
        loop_thread.run(agent.start())
        started.append(agent)
        return Device(agent, link, fetcher)

    yield make
    for agent in started:
        loop_thread.run(agent.stop())


def test_the_device_runtime_passes_its_golden_set(
    device: Any, keydir_module: KeyDir, digits_bundle: tuple[Bundle, dict[str, Any]], loop_thread: LoopThread
) -> None:
    bundle, _ = digits_bundle
    # One turn at a time, as a simulated device shares it: fetching the golden set takes a turn of
    # its own, so it must not be fetched while the load's turn is held (that deadlocked).
    d = device(ReferenceFactory(), admission=asyncio.Semaphore(1))
    d.direct(keydir_module, 1, bundle)
    assert d.wait_end(1).state == DS.SERVING
    verdict = wait_for(lambda: d.reported().acceptance.get(bundle.sha256), 5, "the acceptance figures")
    assert verdict["passed"] and verdict["hardware_id"] == HW
    snr = next(c for c in verdict["checks"] if c["figure"] == "snr_db")
    assert snr["measured"] >= snr["limit"]
    # a restarted agent still reports the verdict it reached for the model it serves
    loop_thread.run(d.agent.stop())
    again = device(ReferenceFactory(), dev=d.agent.device_id)
    assert again.agent.running_sha256 == bundle.sha256
    assert wait_for(lambda: again.reported().acceptance.get(bundle.sha256), 5, "the kept verdict") == verdict


def test_a_runtime_that_computes_differently_is_refused_on_the_device(
    device: Any, keydir_module: KeyDir, digits_bundle: tuple[Bundle, dict[str, Any]], tmp_path: Path
) -> None:
    bundle, report = digits_bundle
    # The host gate passed it, and its absolute thresholds would pass the perturbed outputs too.
    assert report["gate"]["verdict"] == "passed"
    compiled = next(c for c in report["acceptance"]["checks"] if c["figure"] == "snr_db")["compiled"]
    perturbed_db = 23.0
    assert perturbed_db >= Gate().min_snr_db and compiled - perturbed_db > 6
    old = make_bundle(tmp_path / "old", keydir_module.key("release"), seed=1)
    d = device(PerturbedFactory(bundle.sha256, perturbed_db))
    d.direct(keydir_module, 1, old)
    assert d.wait_end(1).state == DS.SERVING
    d.direct(keydir_module, 2, bundle)
    end = d.wait_end(2)
    assert end.state == DS.FAILED and end.reason == protocol.ReasonCode.ACCEPTANCE_FAILED
    assert end.detail is not None and "scores.snr_db" in end.detail and "acceptance failed" in end.detail
    # the old model keeps serving; the figures went to the fleet
    assert d.agent.infer(X).model_sha256 == old.sha256
    verdict = wait_for(lambda: d.reported().acceptance.get(bundle.sha256), 5, "the refused figures")
    snr = next(c for c in verdict["checks"] if c["figure"] == "snr_db")
    assert not verdict["passed"] and snr["measured"] < snr["limit"] and snr["measured"] > Gate().min_snr_db
    assert d.agent.metrics.get("acceptance_refusals") == 1


def qemu_x86() -> str:
    """qemu's x86 user-mode emulator, installed from Debian's qemu-user-static where it is
    missing; skips with the reason where it cannot be had."""
    found = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if found is None:
        why = apt_install("qemu-user-static")
        found = shutil.which("qemu-x86_64-static")
        if found is None:
            why = why or "installed without qemu-x86_64-static"
            pytest.skip(f"needs qemu-user-static (qemu-x86_64): {why}")
    return found


def _check_golden(bundle: Bundle, *prefix: str) -> tuple[int, dict[str, Any]]:
    script = Path(__file__).resolve().parents[2] / "scripts" / "check_golden.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    done = subprocess.run(
        [*prefix, sys.executable, str(script), str(bundle.dir)], capture_output=True, text=True, env=env
    )
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.arm64  # the cheap part of the emulation lane: no root, no rootfs, ~5 s
@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an older x86 CPU on an x86 host")
def test_an_avx2_only_x86_device_refuses_what_the_host_gate_passed(
    digits_bundle: tuple[Bundle, dict[str, Any]],
) -> None:
    """The real case: onnxruntime's fused U8S8 kernels on an x86 CPU without VNNI add uint8 x int8
    products in saturating int16. The compiler's gate (QDQ reference semantics) passed the model;
    the same agent runtime on an emulated Haswell (AVX2, no VNNI) refuses it on its golden set."""
    bundle, report = digits_bundle
    assert report["gate"]["verdict"] == "passed"
    code, refused = _check_golden(bundle, qemu_x86(), "-cpu", "Haswell-noTSX")
    snr = next(c for c in refused["checks"] if c["figure"] == "snr_db")
    assert code == 1 and not refused["passed"] and "scores.snr_db" in refused["detail"]
    assert Gate().min_snr_db < snr["measured"] < snr["limit"]  # above the gate's floor, far below compiled
    if {"avx512_vnni", "avx_vnni"} & set(Path("/proc/cpuinfo").read_text().split()):
        code, accepted = _check_golden(bundle)  # this host, with VNNI: exact int32 sums, accepted
        assert code == 0 and accepted["passed"]

"""Inference through the agent's in-process API vs the bare runtime on the same model.

Target: overhead <= 5% or <= 10 us per call, whichever is larger. Every ``Agent.infer``
mints a UUIDv7 inference id and keeps the prediction in the label ring; the
onnxruntime rows measure that alone and again with the directive's capture policy
sampling 1% of the inferences (copied and queued for the writer thread, which runs
meanwhile and competes for the same cores).

- onnxruntime: the demo's int8 digits classifier vs bare ``session.run``;
- LiteRT: a full-int8 ``.tflite`` (a float FULLY_CONNECTED 64 -> 10 built from
  LiteRT's own schema, quantized by the compiler's ai-edge-quantizer path, int8 in
  and out) vs the bare interpreter's ``set_tensor`` + ``invoke`` + ``get_tensor``
  on an input already quantized. ``Agent.infer`` takes float and returns float, so
  its figure includes quantizing the input and dequantizing the output.

Each model is installed into a real agent's slot exactly as an update would leave it.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compiler.examples import train_digits
from compiler.pipeline import compile_model
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.wire import Capture
from signing.keyring import KeyDir, init_keys
from signing.manifest import ENVELOPE_NAME, verify_bundle

CALLS = 20000


def _install(agent: Agent, bundle_dir: Path, tmp: Path) -> None:
    """Put a signed bundle into slot a and serve it, as after an update and a reboot."""
    manifest = verify_bundle(bundle_dir, agent.trust.release_keys)
    partial = tmp / f"{manifest.model_file.sha256}.part"
    shutil.copy(bundle_dir / manifest.model_file.path, partial)
    agent.slots.commit("a", partial, (bundle_dir / ENVELOPE_NAME).read_bytes(), manifest)
    agent.slots.activate("a", 1)
    asyncio.run(agent.restore())


def _time_calls(fn: Callable[[np.ndarray], object], x: np.ndarray, calls: int) -> float:
    for _ in range(500):
        fn(x)
    t = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t) / calls


def run(repeats: int = 5) -> list[dict[str, object]]:
    return [*run_onnx(repeats), *run_litert(repeats)]


def run_litert(repeats: int = 5) -> list[dict[str, object]]:
    from ai_edge_litert.interpreter import Interpreter

    from tests.agent.tflite_models import make_tflite

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_keys(root / "keys")
        keys = KeyDir(root / "keys")
        source = make_tflite(root / "fc.tflite", seed=3)
        rng = np.random.default_rng(0)
        np.savez(root / "calib.npz", x=rng.standard_normal((200, 64)).astype(np.float32))
        result = compile_model(
            source,
            target="tflite-int8",
            calib_path=root / "calib.npz",
            out_dir=root / "bundle",
            release_key=keys.key("release"),
            name="fc",
            version="1",
            release=1,
            gate=None,  # a latency bench: the random layer's accuracy is not the point
        )
        config = AgentConfig(
            "bench-litert", "rpi4", root / "device", keys.trust_path, targets=["tflite-int8"]
        )
        agent = Agent(config, keys.trust_root())
        _install(agent, result.bundle_dir, root)
        path = agent.slots.model_path("a")
        assert path is not None and path.suffix == ".tflite"
        bare = Interpreter(model_path=str(path), num_threads=1)
        bare.allocate_tensors()
        inp, out = bare.get_input_details()[0], bare.get_output_details()[0]
        assert inp["dtype"] == np.int8, "the bench wants a full-int8 model"
        x = rng.standard_normal((1, 64)).astype(np.float32)
        scale, zero = inp["quantization"]
        xq = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
        in_idx, out_idx = inp["index"], out["index"]

        def bare_call(v: np.ndarray) -> object:
            bare.set_tensor(in_idx, v)
            bare.invoke()
            return bare.get_tensor(out_idx)

        row = _overhead_row(
            "agent.infer, LiteRT full-int8 FC 64->10, batch 1 (float in/out)",
            "set_tensor+invoke+get_tensor (int8)",
            (bare_call, xq),
            (agent.infer, x),
            repeats,
        )
    return [row]


def _overhead_row(
    bench: str,
    baseline: str,
    bare: tuple[Callable[[np.ndarray], object], np.ndarray],
    mine: tuple[Callable[[np.ndarray], object], np.ndarray],
    repeats: int,
) -> dict[str, object]:
    """Time the bare runtime call and the agent's call alternately ``repeats`` times (so drift
    hits both alike) and report the medians with the overhead target."""
    return _overhead_rows(baseline, bare, [(bench, mine, None)], repeats)[0]


Variant = tuple[str, tuple[Callable[[np.ndarray], object], np.ndarray], Callable[[], object] | None]


def _overhead_rows(
    baseline: str,
    bare: tuple[Callable[[np.ndarray], object], np.ndarray],
    variants: list[Variant],
    repeats: int,
) -> list[dict[str, object]]:
    """Each round times the bare call, then every variant (its ``setup`` first, untimed); a row
    per variant with the medians and the range of its per-round overhead over the bare call (a
    loaded machine moves both, a round's difference less)."""
    bare_times: list[float] = []
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        bare_times.append(_time_calls(bare[0], bare[1], CALLS))
        for i, (_, (fn, x), setup) in enumerate(variants):
            if setup is not None:
                setup()
            times[i].append(_time_calls(fn, x, CALLS))
    base_us = statistics.median(bare_times) * 1e6
    rows: list[dict[str, object]] = []
    for (bench, _, _), mine in zip(variants, times, strict=True):
        mine_us = statistics.median(mine) * 1e6
        deltas = [(m - b) * 1e6 for m, b in zip(mine, bare_times, strict=True)]
        rows.append(
            {
                "bench": bench,
                "baseline": baseline,
                "baseline_us": round(base_us, 2),
                "edgefleet_us": round(mine_us, 2),
                "ratio": round(mine_us / base_us, 3),
                "target": f"<= 1.05 or +10 us (+{mine_us - base_us:.1f} us)",
                "overhead_us": f"{min(deltas):.1f}..{max(deltas):.1f}",  # per-round range
            }
        )
    return rows


def run_onnx(repeats: int = 5) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_keys(root / "keys")
        keys = KeyDir(root / "keys")
        ex = train_digits(root / "digits")
        result = compile_model(
            ex.model_path,
            target="arm64-cpu",
            calib_path=ex.calib_path,
            eval_path=ex.eval_path,
            out_dir=root / "bundle",
            release_key=keys.key("release"),
            name="digits",
            version="1",
            release=1,
        )
        config = AgentConfig("bench-0", "rpi4", root / "device", keys.trust_path)
        agent = Agent(config, keys.trust_root())
        _install(agent, result.bundle_dir, root)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        bare = ort.InferenceSession(
            str(agent.slots.model_path("a")), opts, providers=["CPUExecutionProvider"]
        )
        x = np.load(ex.eval_path)["x"][:1].astype(np.float32)

        def bare_call(v: np.ndarray) -> object:
            return bare.run(None, {"input": v})

        policy = Capture(upload_url="http://127.0.0.1:9/captures", sample_rate=0.01)  # nothing uploads
        rows = _overhead_rows(
            "session.run",
            (bare_call, x),
            [
                (
                    "agent.infer (inference id + label ring), digits int8, batch 1",
                    (agent.infer, x),
                    lambda: agent.capture.apply(None),
                ),
                (
                    "agent.infer + capture sampling 1%, digits int8, batch 1",
                    (agent.infer, x),
                    lambda: agent.capture.apply(policy),
                ),
            ],
            repeats,
        )
        m = agent.metrics
        rows[-1]["captured"] = m.get("captured", 0)
        rows[-1]["skipped"] = m.get("capture_skipped", 0)
        agent.capture.stop()
    return rows

"""Agent benchmarks: p99 latency during 100 hot swaps vs steady, and idle RSS.

- ``swap``: 3 threads call ``agent.infer`` non-stop through 10 pairs of a steady
  phase (0.2 s) and 10 swaps between two models (100 swaps in all), each a
  fleet-signed directive delivered through the agent's link (held in memory: no
  broker in the measurement) and carried out by its real path (signature and seq
  checks, slot lookup, re-verify, load + warm aside, swap one reference). Target:
  p99 during swaps <= 2x steady p99, 0 failures.
- ``rss``: a fresh interpreter builds an Agent (no model loaded, no broker)
  and reports VmRSS; once with onnxruntime imported (target <= 80 MB) and once
  with onnxruntime blocked and LiteRT only (target <= 60 MB). Baseline: the
  bare interpreter with just the runtime imported. Both measure a device's package set
  (no dnspython, which only the development extra brings).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device_agent import wire as protocol
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.memory_link import MemoryLink
from signing.dsse import sign_envelope
from signing.keyring import KeyDir, init_keys
from signing.keys import KeyPair
from signing.manifest import ENVELOPE_NAME, sign_bundle

SWAPS = 100
THREADS = 3
BLOCKS = 10  # steady/swapping pairs (see bench_swaps)


def _model(path: Path, seed: int) -> Path:
    """[N,64] -> MatMul(64x256) -> Relu -> MatMul(256x10): a small real graph, ~10 us per call."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 256)).astype(np.float32)
    w2 = rng.standard_normal((256, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["scores"]),
        ],
        f"bench{seed}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return path


def _install(agent: Agent, keys: KeyDir, root: Path, seed: int, slot: str) -> protocol.ModelRef:
    d = root / f"m{seed}"
    _model(d / "model.onnx", seed)
    manifest = sign_bundle(
        d,
        {
            "name": "bench",
            "version": str(seed),
            "release": seed,
            "target": "arm64-cpu",
            "hardware_ids": ["hw"],
        },
        ["model.onnx"],
        keys.key("release"),
    )
    part = root / f"{seed}.part"
    part.write_bytes((d / "model.onnx").read_bytes())
    agent.slots.commit(slot, part, (d / ENVELOPE_NAME).read_bytes(), manifest)
    f = manifest.model_file
    return protocol.ModelRef(
        name="bench",
        version=str(seed),
        release=seed,
        target="arm64-cpu",
        sha256=f.sha256,
        length=f.length,
        model_url="http://unused.invalid/m",
        envelope_url="http://unused.invalid/e",
    )


def _directive(key: KeyPair, device_id: str, seq: int, ref: protocol.ModelRef) -> bytes:
    now = protocol.utcnow()
    doc = {
        "device_id": device_id,
        "seq": seq,
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(hours=1)).isoformat(),
        "model": ref.to_dict(),
    }
    return json.dumps(
        sign_envelope(json.dumps(doc).encode(), protocol.DIRECTIVE_PAYLOAD_TYPE, [key])
    ).encode()


def _p99(xs: list[float]) -> float:
    return float(np.percentile(np.asarray(xs), 99)) if xs else float("nan")


def bench_swaps(steady_s: float = 2.0) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_keys(root / "keys")
        keys = KeyDir(root / "keys")
        link = MemoryLink("bench-swap")
        config = AgentConfig("bench-swap", "hw", root / "dev", keys.trust_path)
        agent = Agent(config, keys.trust_root(), link=link)
        refs = [_install(agent, keys, root, 1, "a"), _install(agent, keys, root, 2, "b")]
        agent.slots.activate("a", 1)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(agent.start())
        fleet = keys.key("fleet")

        async def swap(seq: int, ref: protocol.ModelRef) -> None:
            link.deliver(_directive(fleet, "bench-swap", seq, ref))
            done = await link.wait_until(
                lambda: (
                    agent.deployment.seq == seq and agent.deployment_state == protocol.DeploymentState.SERVING
                )
            )
            assert done, f"swap {seq} did not finish: {agent.deployment}"

        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        phase = ["warm"]
        lat: dict[str, list[float]] = {"steady": [], "swaps": []}
        failures = [0]
        stop = threading.Event()

        def hammer() -> None:
            mine: dict[str, list[float]] = {"steady": [], "swaps": [], "warm": []}
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = agent.infer(x).ok
                except Exception:
                    ok = False
                mine[phase[0]].append((time.perf_counter() - t0) * 1e6)
                failures[0] += 0 if ok else 1
            lat["steady"] += mine["steady"]
            lat["swaps"] += mine["swaps"]

        threads = [threading.Thread(target=hammer) for _ in range(THREADS)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        # Steady and swapping time interleaved in BLOCKS pairs, so both p99s are read over the same
        # stretch of the machine's life: one steady phase before all the swaps read a p99 that
        # swung 0.49-1.14 ms from run to run on the 2-core VM while the swapping p99 held at
        # 1.24-1.45 ms, and the ratio followed the baseline's luck.
        swap_s = 0.0
        seq = 1
        for _ in range(BLOCKS):
            phase[0] = "steady"
            time.sleep(steady_s / BLOCKS)
            phase[0] = "swaps"
            t_swaps = time.perf_counter()
            for _ in range(SWAPS // BLOCKS):
                seq += 1
                loop.run_until_complete(swap(seq, refs[(seq - 1) % 2]))
            swap_s += time.perf_counter() - t_swaps
        phase[0] = "warm"
        stop.set()
        for t in threads:
            t.join()
        loop.run_until_complete(agent.stop())
        loop.close()
        swaps_done = agent.metrics.get("swaps", 0)
    steady, during = _p99(lat["steady"]), _p99(lat["swaps"])
    return {
        "bench": f"agent.infer p99 during {SWAPS} swaps ({THREADS} threads)",
        "baseline": "steady p99, same threads",
        "baseline_us": round(steady, 1),
        "edgefleet_us": round(during, 1),
        "ratio": round(during / steady, 3),
        "target": f"<= 2.0, 0 failures (failures {failures[0]}, swaps {swaps_done}, {swap_s:.1f} s)",
    }


# A device installs ``edgefleet[agent]`` (and ``[tflite]``): dnspython is not in it, but the bench's
# venv has it (the dev extra's model-signing -> sigstore-rekor-types -> pydantic[email] ->
# email-validator), and paho imports ``dns.resolver`` whenever it can (SRV lookups), +2.7 MB. The
# child measures the device's package set.
_RSS_CHILD = r"""
import json, sys, tempfile
sys.modules["dns"] = None  # absent on a device (see above)
mode = sys.argv[1]
if mode.endswith("litert"):
    sys.modules["onnxruntime"] = None  # prove the agent needs no onnxruntime on a LiteRT device
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
if mode.startswith("bare"):
    if mode.endswith("litert"):
        import ai_edge_litert.interpreter
    else:
        import onnxruntime
    print(json.dumps({"rss": rss()}))
    raise SystemExit
from pathlib import Path
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from signing.trust import TrustRoot
trust_path, data = Path(sys.argv[2]), Path(sys.argv[3])
if mode == "agent-onnx":
    import onnxruntime
else:
    import ai_edge_litert.interpreter
cfg = AgentConfig("rss", "hw", data, trust_path, targets=["tflite-int8", "arm64-cpu"])
agent = Agent(cfg, TrustRoot.load_file(trust_path))
print(json.dumps({"rss": rss()}))
"""


def _child_rss(mode: str, trust: Path, data: Path) -> float:
    cmd = [sys.executable, "-c", _RSS_CHILD, mode, str(trust), str(data)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    return float(json.loads(out.strip().splitlines()[-1])["rss"])


def bench_rss() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ef-rss-"))
    init_keys(tmp / "keys")
    trust = KeyDir(tmp / "keys").trust_path
    for runtime, target in (("onnx", 80), ("litert", 60)):
        bare = _child_rss(f"bare-{runtime}", trust, tmp / runtime)
        agent = _child_rss(f"agent-{runtime}", trust, tmp / runtime)
        rows.append(
            {
                "bench": f"agent RSS, no model, {runtime} {'imported' if runtime == 'onnx' else 'only'}",
                "baseline": f"python + {runtime} import",
                "baseline_mb": round(bare, 1),
                "edgefleet_mb": round(agent, 1),
                "ratio": round(agent / bare, 3),
                "target": f"<= {target} MB",
            }
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def run() -> list[dict[str, object]]:
    return [bench_swaps(), *bench_rss()]


if __name__ == "__main__":
    for row in run():
        print(row)

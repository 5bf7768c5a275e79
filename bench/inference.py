"""Inference through the agent's in-process API vs bare ``session.run`` on the same model.

Target (issue 5): overhead <= 5% or <= 10 us per call, whichever is larger.
The model is the demo's int8 digits classifier, installed into a real agent's
slot exactly as an update would leave it.
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
from signing.keyring import KeyDir, init_keys
from signing.manifest import ENVELOPE_NAME, verify_bundle

CALLS = 20000


def _time_calls(fn: Callable[[np.ndarray], object], x: np.ndarray, calls: int) -> float:
    for _ in range(500):
        fn(x)
    t = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t) / calls


def run(repeats: int = 5) -> list[dict[str, object]]:
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
        manifest = verify_bundle(result.bundle_dir, keys.trust_root().release_keys)
        config = AgentConfig("bench-0", "rpi4", root / "device", keys.trust_path)
        agent = Agent(config, keys.trust_root())
        partial = root / "model.part"
        shutil.copy(result.bundle_dir / manifest.model_file.path, partial)
        agent.slots.commit("a", partial, (result.bundle_dir / ENVELOPE_NAME).read_bytes(), manifest)
        agent.slots.activate("a", 1)
        asyncio.run(agent._restore())  # serve the installed slot, as after a reboot
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        bare = ort.InferenceSession(
            str(agent.slots.model_path("a")), opts, providers=["CPUExecutionProvider"]
        )
        x = np.load(ex.eval_path)["x"][:1].astype(np.float32)
        bare_times, agent_times = [], []
        for _ in range(repeats):
            bare_times.append(_time_calls(lambda v: bare.run(None, {"input": v}), x, CALLS))
            agent_times.append(_time_calls(agent.infer, x, CALLS))
    base, mine = statistics.median(bare_times) * 1e6, statistics.median(agent_times) * 1e6
    return [
        {
            "bench": "agent.infer, digits int8, batch 1",
            "baseline": "session.run",
            "baseline_us": round(base, 2),
            "edgefleet_us": round(mine, 2),
            "ratio": round(mine / base, 3),
            "target": f"<= 1.05 or +10 us (+{mine - base:.1f} us)",
        }
    ]

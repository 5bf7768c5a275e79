"""Legacy devices with only ``tflite-runtime`` (needs numpy<2): the fallback interpreter, in its own venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .tflite_models import make_tflite

REPO = Path(__file__).resolve().parents[2]
CHILD = r"""
import json, sys
import numpy as np
from device_agent.runtime import AutoRuntimeFactory, tflite_interpreter_module
backend = tflite_interpreter_module()
factory = AutoRuntimeFactory()
model = factory.load(sys.argv[1], "0" * 64)
x = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
print(json.dumps({"backend": backend[0], "numpy": np.__version__,
                  "supports": factory.supports("tflite-int8"), "out": model.run(x)[0].tolist()}))
"""


@pytest.mark.slow
def test_tflite_runtime_fallback_in_its_own_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "tflite-runtime>=2.14", "numpy<2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode != 0:
        pytest.skip(f"cannot install tflite-runtime here: {pip.stderr[-500:]}")
    model = make_tflite(tmp_path / "m.tflite", seed=9)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [str(py), "-c", CHILD, str(model), json.dumps(x.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["backend"] == "tflite_runtime" and doc["numpy"].startswith("1.") and doc["supports"]
    w = np.random.default_rng(9).standard_normal((10, 64)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(doc["out"]), x @ w.T, rtol=1e-4, atol=1e-4)

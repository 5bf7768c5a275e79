"""Verifying a 100 MiB bundle vs raw ``hashlib.sha256`` over the same file (target <= 1.2x).

Verification = DSSE signature check + streaming hash + length check, one pass.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from signing.keyring import KeyDir, init_keys
from signing.manifest import sign_bundle, verify_bundle

SIZE = 100 * 1024 * 1024


def _raw_sha(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    h.hexdigest()


def run(repeats: int = 5) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_keys(root / "keys")
        keys = KeyDir(root / "keys")
        bundle = root / "bundle"
        bundle.mkdir()
        with open(bundle / "model.onnx", "wb") as fh:
            for _ in range(SIZE // (1 << 20)):
                fh.write(os.urandom(1 << 20))
        fields = {"name": "big", "version": "1", "release": 1, "target": "arm64-cpu", "hardware_ids": ["x"]}
        sign_bundle(bundle, fields, ["model.onnx"], keys.key("release"))
        trusted = keys.trust_root().release_keys
        raw, ver = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            _raw_sha(bundle / "model.onnx")
            raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            verify_bundle(bundle, trusted)
            ver.append(time.perf_counter() - t)
    base, mine = statistics.median(raw), statistics.median(ver)
    return [
        {
            "bench": "verify 100 MiB bundle",
            "baseline": "hashlib.sha256",
            "baseline_ms": round(base * 1e3, 1),
            "edgefleet_ms": round(mine * 1e3, 1),
            "ratio": round(mine / base, 3),
            "target": "<= 1.2",
        }
    ]

"""Verifying and installing a 100 MiB bundle vs raw ``hashlib.sha256`` over the same file (<= 1.2x).

Verification = DSSE signature check + streaming hash + length check, one pass.
Measured for an Ed25519 release key (bare DSSE envelope) and a P-256 one (the
OpenSSF model-signing form: a Sigstore bundle around the DSSE envelope).
Install = the same verification of a downloaded file, then the agent's own slot
commit (atomic rename into the inactive slot, envelope and state.json written
with fsync): what a device does with a bundle once its bytes are on disk. The
over-HTTP download itself is measured separately in bench/trust.py.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from device_agent.slots import SlotStore
from signing.keyring import KeyDir, init_keys
from signing.manifest import ENVELOPE_NAME, manifest_from_envelope, sign_bundle, verify_bundle, verify_file

SIZE = 100 * 1024 * 1024


def _raw_sha(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    h.hexdigest()


def run(repeats: int = 5) -> list[dict[str, object]]:
    return _run(repeats, "ed25519", "") + _run(repeats, "ecdsa-p256", ", P-256 OpenSSF form")


def _run(repeats: int, algorithm: str, label: str) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_keys(root / "keys", release_algorithm=algorithm)
        keys = KeyDir(root / "keys")
        bundle = root / "bundle"
        bundle.mkdir()
        with open(bundle / "model.onnx", "wb") as fh:
            for _ in range(SIZE // (1 << 20)):
                fh.write(os.urandom(1 << 20))
        fields = {"name": "big", "version": "1", "release": 1, "target": "arm64-cpu", "hardware_ids": ["x"]}
        sign_bundle(bundle, fields, ["model.onnx"], keys.key("release"))
        trusted = keys.trust_root().release_keys
        envelope = (bundle / ENVELOPE_NAME).read_bytes()
        slots = SlotStore(root / "device")
        raw, ver, inst = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            _raw_sha(bundle / "model.onnx")
            raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            verify_bundle(bundle, trusted)
            ver.append(time.perf_counter() - t)
            partial = slots.partial_path("a", "bench")
            os.replace(bundle / "model.onnx", partial)  # as the downloader leaves it
            t = time.perf_counter()
            manifest = manifest_from_envelope(envelope, trusted)
            verify_file(partial, manifest.model_file)
            info = slots.commit("a", partial, envelope, manifest)
            inst.append(time.perf_counter() - t)
            os.replace(slots.slot_dir("a") / info.file, bundle / "model.onnx")
    base = statistics.median(raw)
    return [
        {
            "bench": name,
            "baseline": "hashlib.sha256",
            "baseline_ms": round(base * 1e3, 1),
            "edgefleet_ms": round(statistics.median(times) * 1e3, 1),
            "ratio": round(statistics.median(times) / base, 3),
            "target": "<= 1.2",
        }
        for name, times in (
            (f"verify 100 MiB bundle{label}", ver),
            (f"verify + install 100 MiB bundle into a slot{label}", inst),
        )
    ]

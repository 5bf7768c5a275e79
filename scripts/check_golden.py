"""Run a bundle's acceptance check (its signed golden set) on this machine's agent runtime.

``python scripts/check_golden.py BUNDLE_DIR`` loads the bundle's model with the agent's
runtime (``device_agent.runtime.AutoRuntimeFactory``), runs the check the agent runs before a
swap (``device_agent.reconcile.check_golden``) and prints the verdict as JSON; exit 0 when it
passes, 1 when the device would refuse the swap. Under ``qemu-x86_64 -cpu Haswell-noTSX`` it
shows what an AVX2-only x86 device (no VNNI: int8 products saturate in int16) would do.
The bundle's signature is not checked here: this is a numerics probe, not an install.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from device_agent import acceptance
from device_agent.reconcile import check_golden
from device_agent.runtime import AutoRuntimeFactory
from signing.manifest import read_bundle


def main(bundle: str) -> int:
    root = Path(bundle)
    manifest = read_bundle(root)
    spec = acceptance.Spec.from_manifest(manifest.to_dict())
    if spec is None:
        print(json.dumps({"error": "the bundle carries no golden set"}))
        return 2
    model = AutoRuntimeFactory().load(root / manifest.model_file.path, manifest.model_file.sha256)
    verdict = check_golden(spec, (root / spec.file).read_bytes(), model)
    print(json.dumps(verdict.to_dict() | {"detail": verdict.detail}))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

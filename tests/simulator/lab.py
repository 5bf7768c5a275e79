"""What the fleet tests set up alike: devices, a released bundle the artifact server holds,
workload inputs, and every device directed to that bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from agent.harness import ArtifactServer, Bundle, Observer, make_bundle, sign_directive, unique_id

from signing.keyring import KeyDir
from simulator.fleet import DeviceSpec


def lab_fleet(
    prefix: str,
    devices: int,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    rows: int = 8,
    **spec: Any,
) -> tuple[list[DeviceSpec], Bundle, np.ndarray]:
    """``devices`` specs named after ``prefix`` (unique per run), a bundle signed by the release
    key and served by ``artifacts``, and ``rows`` random inputs for the workload."""
    name = unique_id(prefix)
    specs = [DeviceSpec(f"{name}-{i:03d}", "rpi4", **spec) for i in range(devices)]
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    samples = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    return specs, bundle, samples


def direct_all(
    observer: Observer, keydir: KeyDir, artifacts: ArtifactServer, specs: list[DeviceSpec], bundle: Bundle
) -> None:
    """Publish each device's signed directive (seq 1) to install ``bundle``."""
    fleet_key = keydir.key("fleet")
    for spec in specs:
        observer.publish(
            spec.device_id, sign_directive(fleet_key, spec.device_id, 1, artifacts.model_ref(bundle))
        )

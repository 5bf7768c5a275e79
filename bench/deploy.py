"""``edgefleet deploy`` wall time for three hardware classes, against doing the same by hand.

A real server (real HTTP, SQLite, the production Mosquitto) with devices of three classes
(rpi4 -> arm64-cpu and qcs6490 -> qnn-htp by the compiler's defaults, qcs8550 -> qnn-htp-a16
by an applied HardwareTargets document), the digits model trained here. Each figure is the
wall time of real CLI processes, as a person or a CI job runs them:

- baseline: by hand, per class ``edgefleet compile`` + ``models push`` + ``rollouts create``
  (nine commands, one after another);
- edgefleet: one ``edgefleet deploy`` (compiles in parallel, one worker per usable CPU);
- and ``edgefleet deploy --jobs 1`` (compiles one after another) to show what the workers buy.

Every run gets fresh versions so each one compiles, pushes and rolls out; the devices are
released between runs (their rollouts aborted). The machine is shared: the load average
is printed with the figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLASSES = {"rpi4": "arm64-cpu", "qcs6490": "qnn-htp", "qcs8550": "qnn-htp-a16"}
MAPPING = """\
apiVersion: edgefleet.dev/v1
kind: HardwareTargets
metadata: {name: default}
spec:
  targets: {qcs8550: qnn-htp-a16}
"""
POLICY = """\
apiVersion: edgefleet.dev/v1
kind: RolloutPolicy
metadata: {name: bench}
spec: {stages: [50, 100], soak_seconds: 0}
"""


def _ef(*args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"edgefleet {' '.join(args[:2])}: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - started


def _release(url: str) -> None:
    """Abort every running rollout so the next run may take the devices."""
    from edgefleet.client import ApiClient

    with ApiClient(url) as conn:
        for r in conn.rollouts():
            if r["state"] in ("running", "paused", "awaiting_approval"):
                conn.rollout_action(str(r["id"]), "abort")


def _by_hand(root: Path, url: str, digits: Any, keys: Path, version: str) -> float:
    total = 0.0
    for hw, target in CLASSES.items():
        bundle = root / f"hand-{version}-{hw}"
        total += _ef(
            "compile", str(digits.model_path), "--calib", str(digits.calib_path),
            "--eval", str(digits.eval_path), "--name", "digits", "--version", f"{version}-{hw}",
            "--target", target, "--hw", hw, "--keys", str(keys), "--out", str(bundle),
            "--latency-repeats", "0", "--mixed-precision-budget", "0",
        )  # fmt: skip
        total += _ef("models", "push", str(bundle), "--keys", str(keys), "--server", url)
        total += _ef(
            "rollouts", "create", "--model", f"digits:{version}-{hw}", "--selector", f"app=ocr,hw={hw}",
            "--stages", "50,100", "--soak", "0", "--server", url,
        )  # fmt: skip
    return total


def _deploy(url: str, digits: Any, keys: Path, policy: Path, version: str, *extra: str) -> float:
    return _ef(
        "deploy", str(digits.model_path), "--selector", "app=ocr", "--policy", str(policy),
        "--calib", str(digits.calib_path), "--eval", str(digits.eval_path), "--version", version,
        "--keys", str(keys), "--mixed-precision-budget", "0", "--server", url, "--json", *extra,
    )  # fmt: skip


def run(repeats: int = 2) -> list[dict[str, object]]:
    from compiler.examples import train_digits
    from edgefleet.broker import server_mqtt_settings, start_secure_broker
    from edgefleet.client import ApiClient
    from fleet_server.runner import ServerThread
    from fleet_server.settings import ServerSettings
    from signing.keyring import init_keys

    hand: list[float] = []
    parallel: list[float] = []
    serial: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = root / "keys"
        init_keys(keys)
        digits = train_digits(root / "digits")
        (root / "fleet.yaml").write_text(MAPPING)
        policy = root / "policy.yaml"
        policy.write_text(POLICY)
        with start_secure_broker(root / "mq") as broker:
            settings = ServerSettings(
                data_dir=root / "server",
                keys_dir=keys,
                auth_required=False,
                **server_mqtt_settings(broker.info),
            )
            srv = ServerThread(settings).start()
            try:
                with ApiClient(srv.url) as conn:
                    for hw in CLASSES:
                        for i in range(2):
                            conn.register_device(f"{hw}-{i}", hw, {"app": "ocr"})
                _ef("apply", "-f", str(root / "fleet.yaml"), "--server", srv.url)
                for i in range(repeats):
                    hand.append(_by_hand(root, srv.url, digits, keys, f"h{i}"))
                    _release(srv.url)
                    parallel.append(_deploy(srv.url, digits, keys, policy, f"p{i}"))
                    _release(srv.url)
                    serial.append(_deploy(srv.url, digits, keys, policy, f"s{i}", "--jobs", "1"))
                    _release(srv.url)
            finally:
                srv.stop()
                srv.context.engine.dispose()
    best_hand, best_parallel, best_serial = min(hand), min(parallel), min(serial)
    return [
        {
            "bench": "deploy digits to 3 hardware classes (arm64-cpu, qnn-htp, qnn-htp-a16)",
            "baseline": "by hand: compile + push + rollouts create per class (9 commands)",
            "baseline_s": round(best_hand, 1),
            "edgefleet_s": round(best_parallel, 1),
            "ratio": round(best_parallel / best_hand, 2),
            "target": "< 1 (one command, faster than by hand)",
            "deploy_jobs1_s": round(best_serial, 1),
            "parallel_vs_jobs1": round(best_parallel / best_serial, 2),
            "runs": repeats,
            "cpus": len(os.sched_getaffinity(0)),
            "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        }
    ]


if __name__ == "__main__":
    for row in run():
        print(row)

"""``python -m device_agent`` runs one agent until SIGTERM and exits cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import Observer, mqtt_toml, unique_id, wait_for


def test_run_agent_until_sigterm(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, observer: Observer
) -> None:
    dev = unique_id()
    conf = tmp_path / "device.toml"
    conf.write_text(
        f'[agent]\ndevice_id = "{dev}"\nhardware_id = "rpi4"\ndata_dir = "data"\n'
        f'trust_path = "{keydir.trust_path}"\n' + mqtt_toml(broker_info, dev)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "--config", str(conf), "--workload-hz", "5"],
        cwd=Path(__file__).resolve().parents[2],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: any(t.endswith(f"{dev}/status") for t, _ in list(observer.messages)),
            timeout=20,
            what="online",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "data" / "slots" / "a").is_dir()

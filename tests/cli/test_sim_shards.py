"""`edgefleet sim fleet --shards`: real agents over several production brokers, each on its own shard."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.broker import mosquitto_binary, start_secure_shards
from fleet_server.shards import assign
from signing.keyring import init_keys

EXE = str(Path(sys.executable).parent / "edgefleet")


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_sim_fleet_puts_each_agent_on_its_shard(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    devices = [f"shd-{i:05d}" for i in range(8)]
    with start_secure_shards(2, tmp_path / "brokers", keys_dir=keys) as group:
        proc = subprocess.Popen(
            [EXE, "sim", "fleet", "-n", "8", "--prefix", "shd", "--shards", str(group.shards_file),
             "--keys", str(keys), "--trust", str(keys / "trust.json"), "--no-register",
             "--data-root", str(tmp_path / "sim"), "--workload-hz", "0", "--insecure-no-passphrase",
             "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("}"):
                    break
            out = json.loads("".join(lines) or "{}")
            assert out.get("devices") == 8 and out["tls"] is True, proc.stderr.read() if proc.stderr else ""
            # each broker saw its own devices connect, and no other
            for name in ("shard-0", "shard-1"):
                log = (tmp_path / "brokers" / name / "mosquitto.log").read_text()
                seen = {d for d in devices if f" as {d} " in log or f" as {d}\n" in log}
                assert seen == {d for d in devices if assign(d, ["shard-0", "shard-1"]) == name}, (name, seen)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

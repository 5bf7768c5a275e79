"""A fleet takes its agents out of the collector's generations (``gc.freeze``) in a process nobody
froze, as the simulator's own, and gives them back on stop; in a process whose heap is already
frozen (the suite's workers, an embedder) it leaves the heap as it is: ``gc.unfreeze`` cannot tell
the embedder's objects from the fleet's.

Each case runs in a fresh interpreter: the suite's worker froze its heap after collection, and a
test that froze or unfroze it would change every later test in that worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from agent.harness import unique_id

from edgefleet.broker import BrokerInfo, fleet_mqtt_keys
from signing.keyring import KeyDir

REPO = Path(__file__).resolve().parents[2]

FLEET = """
import gc, json, sys
from pathlib import Path
from device_agent.config import BrokerInfo
from simulator.fleet import DeviceSpec, Fleet

args = json.loads(sys.argv[1])
if args["embedder_froze"]:
    embedders = [object()]  # a container: tracked by the collector
    gc.collect()
    gc.freeze()
frozen = gc.get_freeze_count()

def still_frozen():
    return not any(o is embedders for o in gc.get_objects())

fleet = Fleet(
    [DeviceSpec(args["device"], "rpi4", {})], BrokerInfo(**args["broker"]), Path(args["trust"]),
    Path(args["data"]), credentials=args["credentials"],
)
fleet.start()
during = gc.get_freeze_count()
embedder_kept = still_frozen() if args["embedder_froze"] else None
fleet.stop()
after = gc.get_freeze_count()
print(json.dumps({
    "before": frozen, "during": during, "after": after, "embedder_kept": embedder_kept,
    "embedder_kept_after": still_frozen() if args["embedder_froze"] else None,
}))
"""


def _run(embedder_froze: bool, broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path) -> dict[str, object]:
    device = unique_id("gc")
    broker = {
        f: getattr(broker_info, f) for f in ("host", "port", "mqtt_version", "shared_subscriptions", "kind")
    }
    args = {
        "embedder_froze": embedder_froze,
        "device": device,
        "broker": broker,
        "trust": str(keydir.trust_path),
        "data": str(tmp_path / "fleet"),
        "credentials": fleet_mqtt_keys(broker_info, [device]),
    }
    done = subprocess.run(
        [sys.executable, "-c", FLEET, json.dumps(args, default=str)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("embedder_froze", [False, True], ids=["nobody-froze", "embedder-froze"])
def test_a_fleet_freezes_only_a_heap_nobody_froze(
    embedder_froze: bool, broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path
) -> None:
    got = _run(embedder_froze, broker_info, keydir, tmp_path)
    if not embedder_froze:
        assert got["before"] == 0
        assert (
            isinstance(got["during"], int) and got["during"] > 1000
        )  # the agents, out of the collector's sight
        assert got["after"] == 0  # a stopped fleet's objects are collectable again
    else:
        before, during, after = got["before"], got["during"], got["after"]
        assert isinstance(before, int) and isinstance(during, int) and isinstance(after, int)
        # no freeze by the fleet (frozen objects only leave the count by dying), no unfreeze either
        assert 0 < during <= before and 0 < after <= before
        assert got["embedder_kept"] is True and got["embedder_kept_after"] is True

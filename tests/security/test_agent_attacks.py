"""The attack suite end to end: real broker, real HTTP, real TUF repository, the real agent.

Each attack must be refused with a specific reason, reported upstream as an
Event (and in the retained Reported's ``last_rejection``), while the device
keeps serving the model it had. The fixture's device serves ``tiny:1``.
"""

from __future__ import annotations

import shutil
import time
from datetime import timedelta

from device_agent import protocol
from signing.keyring import revoke_key, rotate_keys
from signing.keys import generate_keypair
from signing.tuf_repo import build_root
from tests.agent.harness import wait_for
from tests.security.agent_harness import Fleet


def test_a_released_bundle_installs_and_trust_state_is_stored(fleet: Fleet) -> None:
    """The baseline every attack is measured against: release + directive = install."""
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.installs(b, fleet.direct(b))
    store = fleet.agent.trust_store
    assert store is not None and store.path.exists()
    assert store.state.last_seq == fleet.seq and store.state.repository_url == fleet.repo_url
    assert not store.path.is_relative_to(fleet.agent.slots.slot_dir("a").parent)  # outside the slots


def test_tampered_bundle(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    data = bytearray(b.model_path.read_bytes())
    data[-1] ^= 0xFF
    fleet.artifacts.overrides[b.sha256] = bytes(data)
    fleet.refused(fleet.direct(b), "digest_mismatch")


def test_unsigned_bundle_is_not_in_the_release_metadata(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")  # DSSE-signed and served, but never released through TUF
    fleet.refused(fleet.direct(b), "target_not_found")


def test_bundle_signed_by_an_unknown_key(fleet: Fleet) -> None:
    rogue = generate_keypair()
    b = fleet.bundle(seed=2, version="2", key=rogue)
    fleet.release(b, keys=[rogue])
    fleet.refused(fleet.direct(b), "metadata_unsigned")


def test_bundle_signed_by_a_revoked_release_key(fleet: Fleet) -> None:
    old_release = fleet.keydir.key("release")
    revoke_key(fleet.keydir, old_release.keyid[:12])
    fleet.repo.publish_root(fleet.keydir.tuf_root())
    b = fleet.bundle(seed=2, version="2", key=old_release)
    fleet.release(b, keys=[old_release])
    fleet.refused(fleet.direct(b), "metadata_unsigned")


def test_replayed_older_directive(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.refused(fleet.direct(b, seq=1), "stale_sequence")


def test_replayed_older_metadata_rollback(fleet: Fleet) -> None:
    old_timestamp = (fleet.repo.metadata_dir / "timestamp.json").read_bytes()
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.installs(b, fleet.direct(b))  # the device now trusts the newer timestamp
    c = fleet.bundle(seed=3, version="3")
    fleet.release(c)
    (fleet.repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    fleet.refused(fleet.direct(c), "metadata_rollback")


def test_expired_metadata_freeze(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.repo.refresh_timestamp(fleet.keydir.key("fleet"), expiry=timedelta(seconds=-60))
    fleet.refused(fleet.direct(b), "metadata_expired")


def test_oversized_download_endless_data(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.artifacts.overrides[b.sha256] = b.model_path.read_bytes() + b"\0" * (1 << 20)
    fleet.refused(fleet.direct(b), "length_mismatch")
    assert not list(fleet.agent.slots.slot_dir("b").glob("*.part"))  # the oversized part is gone


def test_mix_and_match_of_metadata_versions(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    old_targets = (
        fleet.repo.metadata_dir / f"{fleet.repo.targets().signed.version}.targets.json"
    ).read_bytes()
    c = fleet.bundle(seed=3, version="3")
    fleet.release(c)
    # the snapshot pins the newest targets version; the server answers it with the older file
    (fleet.repo.metadata_dir / f"{fleet.repo.targets().signed.version}.targets.json").write_bytes(old_targets)
    fleet.refused(fleet.direct(c), "metadata_mix_and_match")


def test_bundle_for_other_hardware(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b, hardware_ids=["jetson-orin"])
    fleet.refused(fleet.direct(b), "hardware_mismatch")


def test_directive_and_release_metadata_disagree(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    c = fleet.bundle(seed=3, version="2", name="other")
    fleet.release(c)  # released under another name: the directive's target is not the released bytes
    ref = fleet.artifacts.model_ref(b, name="other", release=2)
    fleet.seq += 1
    from tests.agent.harness import sign_directive

    fleet.observer.publish(
        fleet.device_id, sign_directive(fleet.keydir.key("fleet"), fleet.device_id, fleet.seq, ref)
    )
    fleet.refused(fleet.seq, "directive_mismatch")


def test_release_below_the_revocation_floor(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.repo.set_floor("tiny", 3, fleet.keydir.keys("release"))
    fleet.repo.publish(fleet.keydir.key("fleet"))
    fleet.refused(fleet.direct(b), "below_revocation_floor")
    store = fleet.agent.trust_store
    assert store is not None and store.state.floors == {"tiny": 3}  # learnt, persisted, never forgotten


def test_the_floor_also_bars_swapping_back_to_a_revoked_release_still_in_a_slot(fleet: Fleet) -> None:
    first = fleet.serving  # release 1, stays in the inactive slot
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.installs(b, fleet.direct(b))
    fleet.repo.set_floor("tiny", 2, fleet.keydir.keys("release"))
    fleet.repo.publish(fleet.keydir.key("fleet"))
    assert fleet.agent.slots.find(first.sha256) is not None
    fleet.refused(fleet.direct(first), "below_revocation_floor")


def test_a_fleet_rollback_to_an_older_allowed_release_is_just_a_newer_directive(fleet: Fleet) -> None:
    first = fleet.serving
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.installs(b, fleet.direct(b))
    fleet.installs(first, fleet.direct(first))


def test_online_fleet_key_alone_cannot_install_an_unreleased_bundle(fleet: Fleet) -> None:
    fleet_key = fleet.keydir.key("fleet")
    b = fleet.bundle(seed=2, version="2", key=fleet_key)  # bundle "signed" by the stolen online key
    fleet.release(b, keys=[fleet_key], fleet_key=fleet_key)  # targets signed by it too
    fleet.refused(fleet.direct(b, key=fleet_key), "metadata_unsigned")


def test_directive_addressed_to_another_device(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    fleet.refused(fleet.direct(b, device_id="someone-else"), "wrong_device")


def test_device_follows_a_root_rotation_chain_and_refuses_the_old_keys(fleet: Fleet) -> None:
    """v1 -> v2 (new root keys 2-of-3, new release and fleet keys): the device walks the chain when a
    directive arrives signed by the new fleet key, installs a bundle signed by the new release key,
    and from then on refuses the retired fleet key."""
    old_fleet = fleet.keydir.key("fleet")
    rotate_keys(fleet.keydir, root_keys=3, root_threshold=2, release=True, fleet=True)
    fleet.repo.publish_root(fleet.keydir.tuf_root())
    fleet.repo.resign_targets(fleet.keydir.keys("release"))
    b = fleet.bundle(seed=2, version="2")  # DSSE by the new release key
    fleet.release(b)  # targets by the new release key, snapshot/timestamp by the new fleet key
    fleet.installs(b, fleet.direct(b))
    store = fleet.agent.trust_store
    assert store is not None and store.state.root_version == 2
    c = fleet.bundle(seed=3, version="3")
    fleet.release(c)
    fleet.refused(fleet.direct(c, key=old_fleet), "unknown_key", unverified=True)
    # and the chain survives a restart: the stored root is the anchor now
    fleet.loop.run(fleet.agent.stop())
    from device_agent.agent import Agent

    again = Agent(fleet.agent.config, fleet.keydir.trust_root())
    fleet.agent = again
    fleet.loop.run(again.start())
    assert fleet.loop.run(again.wait_connected(10))
    wait_for(lambda: again.running_sha256 == b.sha256, 10, "restart serves the new model")
    fleet.installs(c, fleet.direct(c))


def test_old_root_key_after_rotation(fleet: Fleet) -> None:
    """Whoever kept the retired root key signs root v3 naming their own fleet key: refused."""
    old_root = fleet.keydir.key("root")
    rotate_keys(fleet.keydir, root_keys=1)
    fleet.repo.publish_root(fleet.keydir.tuf_root())
    attacker = generate_keypair()
    forged = build_root(
        version=3,
        root_keys=[old_root],
        root_threshold=1,
        release_keys=[attacker.public],
        fleet_keys=[attacker.public],
    )
    (fleet.repo.metadata_dir / "3.root.json").write_bytes(forged)
    b = fleet.bundle(seed=2, version="2", key=attacker)
    fleet.refused(fleet.direct(b, key=attacker), "metadata_unsigned", unverified=True)
    store = fleet.agent.trust_store
    assert store is not None and store.state.root_version == 2  # walked to v2, not to the forged v3


def test_repository_gone_is_reported_not_a_verdict(fleet: Fleet) -> None:
    b = fleet.bundle(seed=2, version="2")
    fleet.release(b)
    shutil.rmtree(fleet.repo.metadata_dir)
    fleet.agent.config.delivery_retry_s = 1.0  # retried this long, then failed with the reason
    fleet.refused(fleet.direct(b), "delivery_unavailable")
    assert fleet.agent.deployment_state == protocol.DeploymentState.FAILED


def test_repository_away_briefly_is_retried_then_installs(fleet: Fleet) -> None:
    """Unreachable is not untrusted: a server restart during the release check costs a retry,
    not a failed device (the rollout gate would count that failure)."""
    b = fleet.bundle(seed=3, version="2")
    fleet.release(b)
    hidden = fleet.repo.metadata_dir.with_name("metadata-away")
    fleet.repo.metadata_dir.rename(hidden)
    seq = fleet.direct(b)
    time.sleep(1.0)  # the agent's first check(s) fail: the metadata is gone
    hidden.rename(fleet.repo.metadata_dir)
    fleet.installs(b, seq, timeout=30)
    assert not [e for e in fleet.observer.events(fleet.device_id) if e.seq == seq and e.reason]

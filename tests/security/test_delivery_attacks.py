"""One test per attack on delivery, each refused by python-tuf's Updater with a specific error class.

The device keeps what it had: a refused target never reaches the slot file.
Attackers edit the served files (they control the server or the network); some
also hold stolen keys, as each test says.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from signing import errors
from signing.agreement import check_agreement, check_floor, merge_floors
from signing.keyring import rotate_keys
from signing.keys import KeyPair, generate_keypair
from signing.targets import TargetCustom
from signing.tuf_client import check_target, trusted_root_bytes
from signing.tuf_repo import build_root, signer_for
from tests.security.delivery_harness import MODEL, Delivery

MODEL_BYTES = b"\x08\x01onnx-model" * 1000


def _slot(d: Delivery) -> Path:
    return d.tmp / "slot" / "model.bin"


def _resign(path: Path, *keys: KeyPair, change: object = None) -> None:
    """Attacker tool: rewrite a served metadata file and sign it with the given keys."""
    md = Metadata.from_bytes(path.read_bytes())
    if callable(change):
        change(md.signed)
    md.signatures.clear()
    for k in keys:
        md.sign(signer_for(k), append=True)
    path.write_bytes(md.to_bytes())


def test_a_released_target_is_delivered_with_its_signed_custom_fields(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES, release=4, hardware_ids=["rpi4", "jetson"])
    got = delivery.fetch()
    assert got.path is not None and got.path.read_bytes() == MODEL_BYTES
    assert (got.length, got.custom.release, got.custom.family) == (len(MODEL_BYTES), 4, "face-det")
    assert got.custom.hardware_ids == ["rpi4", "jetson"]
    assert got.floors == {}
    assert got.root_version == 1
    # the metadata-only path (for an agent that streams the bytes itself) agrees
    meta_only = check_target(
        MODEL, trusted_root=delivery.pinned_root, cache_dir=delivery.cache, metadata_url=delivery.metadata_url
    )
    assert (meta_only.sha256, meta_only.path) == (got.sha256, None)


def test_tampered_bundle(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    served = delivery.repo.target_file(MODEL)
    data = bytearray(served.read_bytes())
    data[10] ^= 0xFF
    served.write_bytes(bytes(data))
    with pytest.raises(errors.TargetMismatch) as exc:
        delivery.fetch()
    assert isinstance(exc.value.__cause__, tuf_exc.LengthOrHashMismatchError)
    assert not _slot(delivery).exists()


def test_unsigned_bundle_is_not_a_target(delivery: Delivery) -> None:
    """Bytes dropped next to the real targets, but listed in no signed metadata."""
    delivery.release(MODEL_BYTES)
    (delivery.repo.targets_dir / "face-det" / "evil.onnx").write_bytes(b"evil")
    with pytest.raises(errors.TargetNotFound):
        delivery.fetch("face-det/evil.onnx")


def test_unsigned_targets_metadata(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    version = delivery.repo.targets().signed.version
    _resign(delivery.meta(f"{version}.targets.json"))  # signatures stripped
    with pytest.raises(errors.MetadataUnsigned) as exc:
        delivery.fetch()
    assert isinstance(exc.value.__cause__, tuf_exc.UnsignedMetadataError)


def test_targets_signed_by_an_unknown_key(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    version = delivery.repo.targets().signed.version
    _resign(delivery.meta(f"{version}.targets.json"), generate_keypair())
    with pytest.raises(errors.MetadataUnsigned):
        delivery.fetch()


def test_targets_signed_by_a_revoked_release_key(delivery: Delivery) -> None:
    from signing.keyring import revoke_key

    delivery.release(MODEL_BYTES)
    stolen = delivery.keydir.key("release")
    revoke_key(delivery.keydir, stolen.keyid[:12])
    delivery.repo.publish_root(delivery.keydir.tuf_root())
    delivery.repo.resign_targets(delivery.keydir.keys("release"))
    delivery.repo.publish(delivery.keydir.key("fleet"))
    assert delivery.fetch().custom.release == 1  # the repository re-signed with the new key works

    version = delivery.repo.targets().signed.version
    _resign(delivery.meta(f"{version}.targets.json"), stolen)
    with pytest.raises(errors.MetadataUnsigned):
        delivery.fetch(cache=delivery.tmp / "other-device")


def test_replayed_older_metadata_rollback(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES, release=1)
    old_timestamp = delivery.meta("timestamp.json").read_bytes()
    delivery.release(MODEL_BYTES + b"v2", release=2)
    assert delivery.fetch().custom.release == 2  # the device has now seen the newer timestamp
    delivery.meta("timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(errors.MetadataRollback) as exc:
        delivery.fetch()
    assert isinstance(exc.value.__cause__, tuf_exc.BadVersionNumberError)
    assert _slot(delivery).read_bytes() == MODEL_BYTES + b"v2"  # it keeps what it had


def test_replayed_older_snapshot_listing_older_targets(delivery: Delivery) -> None:
    """A snapshot re-signed by the stolen fleet key that lists an older targets version."""
    delivery.release(MODEL_BYTES, release=1)
    delivery.release(MODEL_BYTES + b"v2", release=2)
    delivery.fetch()
    fleet = delivery.keydir.key("fleet")
    snap_v = delivery.repo.publish(fleet)
    old_targets = delivery.repo.targets().signed.version - 1
    _resign(
        delivery.meta(f"{snap_v}.snapshot.json"),
        fleet,
        change=lambda s: s.meta.__setitem__("targets.json", MetaFile(version=old_targets)),
    )
    with pytest.raises(errors.MetadataRollback):
        delivery.fetch()


def test_expired_metadata_freeze(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    delivery.repo.refresh_timestamp(delivery.keydir.key("fleet"), expiry=timedelta(seconds=-1))
    with pytest.raises(errors.MetadataExpired) as exc:
        delivery.fetch()
    assert isinstance(exc.value.__cause__, tuf_exc.ExpiredMetadataError)
    assert isinstance(exc.value, errors.ExpiredMetadata)


def test_expired_snapshot_freeze(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    delivery.repo.publish(delivery.keydir.key("fleet"), snapshot_expiry=timedelta(seconds=-1))
    with pytest.raises(errors.MetadataExpired):
        delivery.fetch()


def test_oversized_target_endless_data(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    served = delivery.repo.target_file(MODEL)
    served.write_bytes(served.read_bytes() + b"\0" * 1_000_000)
    with pytest.raises(errors.EndlessData) as exc:
        delivery.fetch()
    assert isinstance(exc.value.__cause__, tuf_exc.DownloadLengthMismatchError)
    assert not _slot(delivery).exists()


def test_oversized_timestamp_endless_data(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    delivery.meta("timestamp.json").write_bytes(b" " * 100_000)
    with pytest.raises(errors.EndlessData):
        delivery.fetch()


def test_mix_and_match_of_metadata_versions(delivery: Delivery) -> None:
    """The server answers N.targets.json with an older (validly signed) targets file."""
    delivery.release(MODEL_BYTES, release=1)
    old = delivery.meta(f"{delivery.repo.targets().signed.version}.targets.json").read_bytes()
    delivery.release(MODEL_BYTES + b"v2", release=2)
    delivery.meta(f"{delivery.repo.targets().signed.version}.targets.json").write_bytes(old)
    with pytest.raises(errors.MetadataMixAndMatch) as exc:
        delivery.fetch()
    assert isinstance(exc.value.__cause__, tuf_exc.BadVersionNumberError)


def test_mix_and_match_snapshot(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES, release=1)
    old = delivery.meta("snapshot.json").read_bytes()
    delivery.release(MODEL_BYTES + b"v2", release=2)
    delivery.meta(f"{delivery.repo.snapshot().signed.version}.snapshot.json").write_bytes(old)
    with pytest.raises(errors.MetadataMixAndMatch):
        delivery.fetch()


def test_bundle_for_other_hardware(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES, hardware_ids=["jetson"])
    target = delivery.fetch()
    with pytest.raises(errors.HardwareMismatch):
        check_agreement(
            target, directive_sha256=target.sha256, directive_length=target.length, hardware_id="rpi4"
        )
    check_agreement(
        target, directive_sha256=target.sha256, directive_length=target.length, hardware_id="jetson"
    )


def test_directive_and_release_metadata_disagree(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    target = delivery.fetch()
    with pytest.raises(errors.DirectiveMismatch):
        check_agreement(target, directive_sha256="0" * 64, directive_length=target.length, hardware_id="rpi4")
    with pytest.raises(errors.DirectiveMismatch):
        check_agreement(
            target, directive_sha256=target.sha256, directive_length=target.length + 1, hardware_id="rpi4"
        )


def test_release_below_the_revocation_floor(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES, release=3)
    delivery.release(MODEL_BYTES + b"v5", name="face-det/v5.onnx", release=5)
    delivery.repo.set_floor("face-det", 4, delivery.keydir.keys("release"))
    delivery.repo.publish(delivery.keydir.key("fleet"))
    old = delivery.fetch()
    assert old.floors == {"face-det": 4}
    with pytest.raises(errors.RevokedRelease):
        check_floor(old)
    check_floor(delivery.fetch("face-det/v5.onnx"))  # an allowed release passes
    # a device that stored a higher floor keeps it even if the delivered one is lower
    assert merge_floors({"face-det": 6}, old.floors) == {"face-det": 6}
    with pytest.raises(errors.RevokedRelease):
        check_floor(delivery.fetch("face-det/v5.onnx"), merge_floors({"face-det": 6}, old.floors))
    with pytest.raises(ValueError, match="never go down"):
        delivery.repo.set_floor("face-det", 2, delivery.keydir.keys("release"))


def test_online_fleet_key_alone_cannot_publish_a_target(delivery: Delivery) -> None:
    """The fleet key signs snapshot/timestamp; with it alone an attacker cannot list new bytes."""
    delivery.release(MODEL_BYTES)
    fleet = delivery.keydir.key("fleet")
    evil = delivery.tmp / "evil.onnx"
    evil.write_bytes(b"evil model")
    entry = TargetFile.from_file(MODEL, str(evil))
    entry.unrecognized_fields["custom"] = TargetCustom("face-det", 99, ["rpi4"]).to_dict()
    v = delivery.repo.targets().signed.version + 1

    def forge(t: Targets) -> None:
        t.targets[MODEL] = entry
        t.version = v

    md = delivery.repo.targets()
    forge(md.signed)
    md.signatures.clear()
    md.sign(signer_for(fleet))
    delivery.meta(f"{v}.targets.json").write_bytes(md.to_bytes())
    (delivery.repo.targets_dir / "face-det" / f"{entry.hashes['sha256']}.model.onnx").write_bytes(
        b"evil model"
    )
    soon = datetime.now(UTC) + timedelta(days=1)
    snap = Metadata(Snapshot(version=99, expires=soon, meta={"targets.json": MetaFile(version=v)}))
    snap.sign(signer_for(fleet))
    delivery.meta("99.snapshot.json").write_bytes(snap.to_bytes())
    ts = Metadata(Timestamp(version=99, expires=soon, snapshot_meta=MetaFile(version=99)))
    ts.sign(signer_for(fleet))
    delivery.meta("timestamp.json").write_bytes(ts.to_bytes())
    with pytest.raises(errors.MetadataUnsigned):
        delivery.fetch()
    assert not _slot(delivery).exists()


def test_old_root_key_after_rotation(delivery: Delivery) -> None:
    """After rotating the root, the retired root key alone cannot sign root N+1 for the device."""
    delivery.release(MODEL_BYTES)
    old_root = delivery.keydir.key("root")
    rotate_keys(delivery.keydir, root_keys=1)
    delivery.repo.publish_root(delivery.keydir.tuf_root())
    evil = generate_keypair()
    forged = build_root(
        version=3,
        root_keys=[evil],
        root_threshold=1,
        release_keys=[evil.public],
        fleet_keys=[evil.public],
        previous_root_keys=[old_root],
    )
    delivery.meta("3.root.json").write_bytes(forged)
    with pytest.raises(errors.MetadataUnsigned) as exc:
        delivery.fetch()
    assert isinstance(exc.value.__cause__, tuf_exc.UnsignedMetadataError)
    assert not _slot(delivery).exists()


def test_device_follows_a_root_rotation_chain(delivery: Delivery) -> None:
    """Pinned at v1, the device follows v1 -> v2 (new root keys) -> v3 (new release and fleet keys)."""
    delivery.release(MODEL_BYTES, release=1)
    assert delivery.fetch().root_version == 1
    rotate_keys(delivery.keydir, root_keys=3, root_threshold=2)
    delivery.repo.publish_root(delivery.keydir.tuf_root())
    rotate_keys(delivery.keydir, release=True, fleet=True)
    delivery.repo.publish_root(delivery.keydir.tuf_root())
    delivery.repo.resign_targets(delivery.keydir.keys("release"))
    delivery.release(MODEL_BYTES + b"v2", release=2)
    got = delivery.fetch()
    assert (got.root_version, got.custom.release) == (3, 2)
    newest = trusted_root_bytes(delivery.cache, got.root_version)
    assert Metadata[Root].from_bytes(newest).signed.roles["root"].threshold == 2
    # a brand-new device pinned at v1 (empty cache) follows the same chain
    assert delivery.fetch(cache=delivery.tmp / "fresh").root_version == 3
    # and the stored newest root is a valid anchor on its own
    assert delivery.fetch(cache=delivery.tmp / "anchored", root=newest).root_version == 3
    # the DSSE trust root follows the same chain
    from signing.trust import TrustRoot

    pinned = TrustRoot.load(json.loads(delivery.keydir.path.joinpath("roots/1.trust.json").read_text()))
    assert pinned.follow(delivery.keydir.trust_chain(1)).version == 3


def test_malformed_custom_fields_are_refused(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    release = delivery.keydir.keys("release")
    v = delivery.repo.targets().signed.version

    def strip(t: Targets) -> None:
        t.targets[MODEL].unrecognized_fields["custom"] = {"family": "face-det", "release": "seven"}

    _resign(delivery.meta(f"{v}.targets.json"), *release, change=strip)
    with pytest.raises(errors.MalformedTargetInfo, match="release"):
        delivery.fetch()


def test_repository_unreachable_is_not_a_verdict(delivery: Delivery) -> None:
    delivery.release(MODEL_BYTES)
    delivery.meta("timestamp.json").unlink()
    with pytest.raises(errors.DeliveryUnavailable):
        delivery.fetch()
    assert not _slot(delivery).exists()
    assert datetime.now(UTC)  # keep the import honest for the freeze tests above


def test_repository_created_after_rotations_serves_the_whole_chain(
    delivery: Delivery, tmp_path: Path
) -> None:
    from signing.tuf_repo import TufRepository
    from tests.support.loopback_http import serve_directory

    rotate_keys(delivery.keydir, root_keys=2, root_threshold=2)
    rotate_keys(delivery.keydir, fleet=True)
    kd = delivery.keydir
    repo = TufRepository.create(tmp_path / "www2", kd.tuf_root_chain(), kd.keys("release"), kd.key("fleet"))
    src = tmp_path / "m.bin"
    src.write_bytes(MODEL_BYTES)
    repo.add_target(MODEL, src, TargetCustom("face-det", 1, ["rpi4"]), kd.keys("release"))
    repo.publish(kd.key("fleet"))
    with pytest.raises(ValueError, match="expected root v4"):
        repo.publish_root(kd.tuf_root(2))
    with serve_directory(tmp_path / "www2") as url:
        got = check_target(
            MODEL, trusted_root=kd.tuf_root(1), cache_dir=tmp_path / "c", metadata_url=f"{url}/metadata/"
        )
        assert got.root_version == 3

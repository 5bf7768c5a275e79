"""The static-delivery publisher: upload order, idempotence, and a run cut short at every step.

The repository is a real one (``signing.tuf_repo``), the storage a real directory, and what a
device could see is judged by python-tuf itself, served over real HTTP.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from fleet_server.mirror import (
    TIMESTAMP_KEY,
    BundleSource,
    DirectoryStorage,
    Item,
    Publisher,
    open_storage,
)
from fleet_server.tuf_service import TufService
from signing.keyring import KeyDir, init_keys
from signing.manifest import ENVELOPE_NAME
from signing.targets import TargetCustom
from signing.tuf_client import check_target
from signing.tuf_repo import TufRepository
from tests.support.loopback_http import serve_directory


class Recording(DirectoryStorage):
    """A directory that remembers the order of its puts and can die after ``fail_after`` of them."""

    def __init__(self, root: Path, fail_after: int | None = None) -> None:
        super().__init__(root)
        self.puts: list[str] = []
        self.fail_after = fail_after

    def put(self, item: Item) -> None:
        if self.fail_after is not None and len(self.puts) >= self.fail_after:
            raise OSError("the storage went away")
        super().put(item)
        self.puts.append(item.key)


def _repo(tmp_path: Path) -> tuple[TufRepository, KeyDir]:
    init_keys(tmp_path / "keys")
    keydir = KeyDir(tmp_path / "keys")
    repo = TufRepository.create(
        tmp_path / "tuf", keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet")
    )
    return repo, keydir


def _release(repo: TufRepository, keydir: KeyDir, tmp_path: Path, version: str) -> None:
    src = tmp_path / f"model-{version}.onnx"
    src.write_bytes(f"model bytes of release {version}".encode() * 50)
    custom = TargetCustom(family="tiny", release=int(version), hardware_ids=["hw"])
    repo.add_target(f"models/tiny/{version}", src, custom, keydir.keys("release"))
    repo.publish(keydir.key("fleet"))


def _bundle(tmp_path: Path) -> BundleSource:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / ENVELOPE_NAME).write_text('{"payload": "signed"}')
    (d / "model.onnx").write_bytes(b"m" * 300)
    (d / "golden.npz").write_bytes(b"g" * 40)
    return BundleSource("ab" * 32, d, "model.onnx", ("golden.npz",))


def test_targets_then_bundles_then_versioned_metadata_then_the_timestamp_last(tmp_path: Path) -> None:
    repo, keydir = _repo(tmp_path)
    _release(repo, keydir, tmp_path, "1")
    bundle = _bundle(tmp_path)
    storage = Recording(tmp_path / "mirror")
    report = Publisher(storage, repo.path, lambda: [bundle]).publish()

    puts = storage.puts
    assert puts[-1] == TIMESTAMP_KEY and report.timestamp == "uploaded"
    kinds = [key.split("/")[0] for key in puts[:-1]]
    assert kinds == sorted(kinds, key=["targets", "bundles", "metadata"].index)  # grouped, in that order
    meta = [key.removeprefix("metadata/") for key in puts if key.startswith("metadata/")][:-1]
    roles = [name.split(".")[1] for name in meta]
    assert roles == sorted(roles, key=["root", "targets", "snapshot"].index)
    assert "metadata/2.targets.json" in puts and "metadata/2.snapshot.json" in puts
    assert {"bundles/" + "ab" * 32 + "/envelope", "bundles/" + "ab" * 32 + "/files/golden.npz"} <= set(puts)
    # only versioned metadata and the timestamp: a consistent-snapshot client never asks for the rest
    assert not {"metadata/snapshot.json", "metadata/targets.json", "metadata/root.json"} & set(puts)
    target = repo.target_file("models/tiny/1")
    assert (
        tmp_path / "mirror" / "targets" / "models" / "tiny" / target.name
    ).read_bytes() == target.read_bytes()
    assert (tmp_path / "mirror" / "bundles" / ("ab" * 32) / "model").read_bytes() == b"m" * 300

    # idempotent: a second run uploads nothing; a re-signed timestamp is all a third one uploads
    again = Publisher(storage, repo.path, lambda: [bundle]).publish()
    assert again.uploaded == [] and again.timestamp == "unchanged" and again.unchanged == len(puts) - 1
    repo.refresh_timestamp(keydir.key("fleet"))
    third = Publisher(storage, repo.path, lambda: [bundle]).publish()
    assert third.uploaded == [TIMESTAMP_KEY]


def _consistent(mirror: Path) -> dict[str, str]:
    """What the mirror's timestamp leads to, checked hop by hop; target name -> sha256."""
    ts = Metadata[Timestamp].from_bytes((mirror / "metadata" / "timestamp.json").read_bytes())
    snap_v = ts.signed.snapshot_meta.version
    snap = Metadata[Snapshot].from_bytes((mirror / "metadata" / f"{snap_v}.snapshot.json").read_bytes())
    targets_v = snap.signed.meta["targets.json"].version
    targets = Metadata[Targets].from_bytes((mirror / "metadata" / f"{targets_v}.targets.json").read_bytes())
    out = {}
    for name, entry in targets.signed.targets.items():
        dirname, _, base = name.rpartition("/")
        sha = entry.hashes["sha256"]
        path = mirror / "targets" / dirname / f"{sha}.{base}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, name
        out[name] = sha
    return out


def test_a_run_cut_short_at_any_step_never_shows_devices_an_inconsistent_repository(tmp_path: Path) -> None:
    repo, keydir = _repo(tmp_path)
    _release(repo, keydir, tmp_path, "1")
    good = tmp_path / "published-v1"
    Publisher(DirectoryStorage(good), repo.path).publish()
    _release(repo, keydir, tmp_path, "2")  # release 2: a new target, targets, snapshot, timestamp
    shutil.copytree(good, tmp_path / "count")
    counting = Recording(tmp_path / "count")
    Publisher(counting, repo.path).publish()
    steps = len(counting.puts)
    assert steps >= 4  # target, targets metadata, snapshot, timestamp at least

    for cut in range(steps + 1):
        mirror = tmp_path / f"mirror-{cut}"
        shutil.copytree(good, mirror)
        storage = Recording(mirror, fail_after=cut)
        publisher = Publisher(storage, repo.path)
        if cut < steps:
            with pytest.raises(OSError):
                publisher.publish()
            assert publisher.dirty  # the keeper will run it again
            assert "models/tiny/2" not in _consistent(mirror)  # still release 1, complete
        else:
            publisher.publish()
        # a real TUF client, over real HTTP, from a device that knew nothing: it always verifies
        with serve_directory(mirror) as url:
            check_target(
                "models/tiny/1",
                trusted_root=keydir.tuf_root(),
                cache_dir=tmp_path / f"device-{cut}",
                metadata_url=f"{url}/metadata/",
            )
        # and the run after a crash repairs the mirror
        Publisher(DirectoryStorage(mirror), repo.path).publish()
        assert "models/tiny/2" in _consistent(mirror)


def test_open_storage_names_what_it_takes(tmp_path: Path) -> None:
    assert isinstance(open_storage("", default_dir=tmp_path), DirectoryStorage)
    assert open_storage(str(tmp_path / "x"), default_dir=tmp_path).describe() == str(tmp_path / "x")
    with pytest.raises(ValueError, match="s3://bucket"):
        open_storage("https://cdn.example/x", default_dir=tmp_path)
    with pytest.raises(ValueError, match="leaves the mirror"):
        DirectoryStorage(tmp_path / "m").put(Item("../escape", data=b"x"))


class Flaky(DirectoryStorage):
    """A directory that refuses puts while ``down``."""

    down = False

    def put(self, item: Item) -> None:
        if self.down:
            raise OSError("the bucket is away")
        super().put(item)


def test_the_keeper_publishes_each_re_signing_and_retries_a_failed_publish(tmp_path: Path) -> None:
    repo, keydir = _repo(tmp_path)
    storage = Flaky(tmp_path / "mirror")
    publisher = Publisher(storage, repo.path)
    service = TufService(
        repo.path,
        keydir.path,
        keydir.key("fleet"),
        timestamp_expiry=timedelta(seconds=4),
        publisher=publisher,
    )
    mirrored = tmp_path / "mirror" / "metadata" / "timestamp.json"
    current = repo.path / "metadata" / "timestamp.json"
    assert service.keep_fresh() is None and mirrored.read_bytes() == current.read_bytes()  # at start
    repo.refresh_timestamp(keydir.key("fleet"), timedelta(seconds=1))  # about to expire
    storage.down = True
    assert service.keep_fresh() == "timestamp"  # re-signed, but the publish failed
    assert publisher.dirty and mirrored.read_bytes() != current.read_bytes()
    storage.down = False
    assert service.keep_fresh() is None  # nothing due now, but the last publish failed: published
    assert not publisher.dirty and mirrored.read_bytes() == current.read_bytes()

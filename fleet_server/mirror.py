"""Static delivery: publish what devices download to a directory or an S3-compatible bucket.

Devices with a mirror list (``AgentConfig.mirrors``) fetch everything an install needs
from any static web server or CDN in front of that storage, and the fleet server leaves
the download path. The published tree (docs/trust.md, "Static delivery and mirrors"):

```
metadata/N.root.json  N.targets.json  N.snapshot.json   versioned: never change once written
metadata/timestamp.json                                  the one file replaced in place
targets/<dir>/<sha256>.<name>                           TUF targets (consistent-snapshot names),
                                                        and whatever else sits in the targets tree
bundles/<model sha256>/envelope                         the bundle's DSSE envelope
bundles/<model sha256>/model                            the model file
bundles/<model sha256>/files/<name>                     the bundle's other files (golden set)
```

Every key but ``metadata/timestamp.json`` names immutable content (a version or a
hash is in its path), so a run uploads only what the storage does not hold yet, and
the timestamp goes last: a mirror, or a CDN caching it, never serves a timestamp
pointing at a snapshot, targets metadata or target that is not there. The timestamp
uploaded is the one read at the start of the run, so a repository that changes while
a run uploads is published consistently by the next run. A run that dies half-way
leaves the old timestamp in charge of files that are all still there (nothing is
ever deleted: a device or a cache may still hold an older timestamp). Running it
again is how it is repaired.

Why every byte may sit on untrusted storage: devices verify the TUF metadata against
the root they were provisioned with, and every envelope and model file against its
signed hash and length (decision 0009); a mirror can withhold, never forge.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from signing.manifest import ENVELOPE_NAME

log = logging.getLogger(__name__)

METADATA = "metadata"
TARGETS = "targets"
BUNDLES = "bundles"
TIMESTAMP_KEY = f"{METADATA}/timestamp.json"

# What a CDN or browser may do with each kind of key. Versioned and hashed keys never change;
# the timestamp must be fetched afresh within a minute or two (it is re-signed daily and after
# every release or revocation, and a cache holding it long delays every rollout by as much).
IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
TIMESTAMP_CACHE = "no-cache"


@dataclass(frozen=True)
class Item:
    """One key to publish and where its bytes come from (a file, or bytes read at planning)."""

    key: str
    source: Path | None = None
    data: bytes | None = None
    content_type: str = "application/octet-stream"

    @property
    def immutable(self) -> bool:
        return self.key != TIMESTAMP_KEY

    @property
    def cache_control(self) -> str:
        return IMMUTABLE_CACHE if self.immutable else TIMESTAMP_CACHE

    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.source is not None
        return self.source.stat().st_size

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.source is not None
        return self.source.read_bytes()


@dataclass(frozen=True)
class BundleSource:
    """A stored bundle: its model file's hash, directory, model file and other files (manifest paths)."""

    sha256: str
    directory: Path
    model_file: str
    other_files: tuple[str, ...] = ()


def bundle_items(bundle: BundleSource) -> list[Item]:
    base = f"{BUNDLES}/{bundle.sha256}"
    items = [
        Item(f"{base}/envelope", bundle.directory / ENVELOPE_NAME, content_type="application/json"),
        Item(f"{base}/model", bundle.directory / bundle.model_file),
    ]
    items += [Item(f"{base}/files/{name}", bundle.directory / name) for name in bundle.other_files]
    return items


def _versioned(name: str) -> tuple[int, int] | None:
    """(role order, version) of ``N.role.json``; None for an unversioned name."""
    head, _, role = name.partition(".")
    order = {"root.json": 0, "targets.json": 1, "snapshot.json": 2}
    if not head.isdigit() or role not in order:
        return None
    return order[role], int(head)


def plan(tuf_dir: Path | None, bundles: Iterable[BundleSource]) -> tuple[list[Item], Item | None]:
    """What to publish, in upload order, and the timestamp that goes after all of it.

    The timestamp is read FIRST: the repository writes it last, so every file it
    (transitively) points at exists already and is in the listing that follows.
    Order of the rest: targets, bundles, then versioned metadata root -> targets ->
    snapshot (each pins the one before it), so a reader of the storage who starts
    from any published metadata finds what it names.
    """
    timestamp: Item | None = None
    metadata: list[tuple[tuple[int, int], Item]] = []
    targets: list[Item] = []
    if tuf_dir is not None:
        ts_path = tuf_dir / METADATA / "timestamp.json"
        if ts_path.is_file():
            timestamp = Item(TIMESTAMP_KEY, data=ts_path.read_bytes(), content_type="application/json")
        meta_dir = tuf_dir / METADATA
        for path in sorted(meta_dir.iterdir()) if meta_dir.is_dir() else []:
            order = _versioned(path.name)
            if order is not None and path.is_file():
                metadata.append(
                    (order, Item(f"{METADATA}/{path.name}", path, content_type="application/json"))
                )
        targets_dir = tuf_dir / TARGETS
        if targets_dir.is_dir():
            for root, dirs, files in os.walk(targets_dir):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):  # a file being written (tuf_repo's temporary names)
                        continue
                    path = Path(root) / name
                    targets.append(Item(f"{TARGETS}/{path.relative_to(targets_dir).as_posix()}", path))
    items = list(targets)
    for bundle in bundles:
        items += bundle_items(bundle)
    items += [item for _, item in sorted(metadata, key=lambda pair: pair[0])]
    return items, timestamp


# --- storage backends -------------------------------------------------------------------------


class Storage(Protocol):
    """Where a mirror's files live. ``put`` must be atomic per key (no reader sees half a file)."""

    def describe(self) -> str: ...

    def sizes(self) -> dict[str, int]:
        """Every key the storage holds under its root, with its size (one listing per run)."""
        ...

    def get(self, key: str) -> bytes | None: ...

    def put(self, item: Item) -> None: ...


class DirectoryStorage:
    """A local directory (the default): files appear by ``os.replace`` after an fsync.

    Files are hard-linked in where the source is on the same file system (a 100 MB model
    is not copied twice), else copied; the TUF repository and bundles never rewrite a file
    in place, so a hard link cannot change under a reader.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"key {key!r} leaves the mirror directory")
        return path

    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if not self.root.is_dir():
            return out
        for root, _, files in os.walk(self.root):
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(root) / name
                out[path.relative_to(self.root).as_posix()] = path.stat().st_size
        return out

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, item: Item) -> None:
        dest = self._path(item.key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            if item.source is not None and item.immutable:
                try:
                    os.link(item.source, tmp)
                except OSError:
                    _copy_synced(item.source, tmp)
            else:
                with open(tmp, "wb") as fh:
                    fh.write(item.read())
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)  # the new name is durable before anything that points at it
        finally:
            tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_synced(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


class S3Storage:
    """A bucket on any S3-compatible service (AWS S3, Ceph RGW, Garage, SeaweedFS, ...), via boto3.

    ``url`` is ``s3://bucket/prefix``; ``endpoint_url`` points at a service other than
    AWS. Credentials come from boto3's usual chain (environment, shared config, instance
    role): never from edgefleet's settings. A PutObject is atomic: readers see the old
    object or the new one. Cache-Control is set per key, so a CDN in front obeys it.
    """

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"an S3 mirror is s3://bucket[/prefix], got {url!r}")
        try:
            import boto3
        except ImportError as exc:  # the optional extra
            raise RuntimeError("publishing to S3 needs boto3: pip install 'edgefleet[s3]'") from exc
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.url = url
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region or None)

    def describe(self) -> str:
        return self.url

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        start = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                out[str(obj["Key"])[len(start) :]] = int(obj["Size"])
        return out

    def get(self, key: str) -> bytes | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        data: bytes = resp["Body"].read()
        return data

    def put(self, item: Item) -> None:
        extra = {"ContentType": item.content_type, "CacheControl": item.cache_control}
        if item.source is not None:
            # upload_file switches to multipart above 8 MB; the object appears only when complete
            self.client.upload_file(str(item.source), self.bucket, self._key(item.key), ExtraArgs=extra)
        else:
            self.client.put_object(Bucket=self.bucket, Key=self._key(item.key), Body=item.read(), **extra)


def open_storage(
    target: str, *, default_dir: Path, endpoint_url: str | None = None, region: str | None = None
) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage; a path -> DirectoryStorage; "" -> ``default_dir``."""
    if target.startswith("s3://"):
        return S3Storage(target, endpoint_url=endpoint_url, region=region)
    if "://" in target:
        raise ValueError(f"a mirror is a directory or s3://bucket/prefix, got {target!r}")
    return DirectoryStorage(Path(target) if target else default_dir)


# --- the publisher ----------------------------------------------------------------------------


@dataclass
class Report:
    """What one run did: keys uploaded (in order), keys already there, the timestamp's state."""

    storage: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: int = 0
    timestamp: str = "none"  # "uploaded", "unchanged" or "none" (no repository yet)

    def to_dict(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "uploaded": len(self.uploaded),
            "unchanged": self.unchanged,
            "timestamp": self.timestamp,
        }


class Publisher:
    """Publishes the repository directory and the stored bundles to one storage; one run at a time.

    ``bundles`` lists the bundles to publish (the server reads them from its database
    at each run). Thread-safe: the TUF keeper, an upload and the CLI may all ask.
    """

    def __init__(
        self,
        storage: Storage,
        tuf_dir: Path | None,
        bundles: Callable[[], Iterable[BundleSource]] = lambda: (),
    ) -> None:
        self.storage = storage
        self.tuf_dir = Path(tuf_dir) if tuf_dir is not None else None
        self.bundles = bundles
        self._lock = threading.Lock()
        self.dirty = True  # a run has not completed since the last change (the keeper retries)

    def publish(self) -> Report:
        with self._lock:
            self.dirty = True
            items, timestamp = plan(self.tuf_dir, self.bundles())
            report = Report(self.storage.describe())
            have = self.storage.sizes()
            for item in items:
                if have.get(item.key) == item.size():
                    report.unchanged += 1
                    continue
                self.storage.put(item)
                report.uploaded.append(item.key)
            if timestamp is not None:
                if self.storage.get(timestamp.key) == timestamp.read():
                    report.timestamp = "unchanged"
                else:
                    self.storage.put(timestamp)
                    report.uploaded.append(timestamp.key)
                    report.timestamp = "uploaded"
            self.dirty = False
            return report

    def publish_quietly(self) -> Report | None:
        """Publish; on failure log it and leave ``dirty`` set for the next try (the keeper's)."""
        try:
            report = self.publish()
        except Exception:
            log.exception("publishing to the mirror %s failed; will retry", self.storage.describe())
            return None
        if report.uploaded:
            log.info("published %d file(s) to %s", len(report.uploaded), report.storage)
        return report


__all__ = [
    "IMMUTABLE_CACHE",
    "TIMESTAMP_CACHE",
    "BundleSource",
    "DirectoryStorage",
    "Item",
    "Publisher",
    "Report",
    "S3Storage",
    "Storage",
    "open_storage",
    "plan",
]

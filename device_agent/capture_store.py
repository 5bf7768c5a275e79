"""Captured inferences on the device's disk: an open journal, sealed upload batches, a byte quota.

Layout under ``data_dir/capture/``:

- ``open.jsonl``: the batch being filled. Its first line names the batch (id, model);
  each further line is one captured item (the JSON the upload carries). The writer
  flushes after each burst of appends and only then counts them captured, so a crash
  of the agent loses no item it counted (a power cut can tear the last line; recovery
  drops a line that does not parse);
- ``batches/<batch_id>.<items>.json``: sealed batches, each file exactly the body of
  its upload (so a resend after a crash has the same hash, and the server's
  idempotency on ``batch_id`` holds). Written atomically; batch ids are UUIDv7, so
  the names sort oldest first;
- ``policy.json``: the capture policy of the last accepted directive and where
  stored batches go, so a restart resumes both before any directive arrives.

A batch is sealed when the next item would push its body past ``max_batch_bytes``,
when the model changes (a batch holds one model's items), when it is older than the
writer's batch age, and at recovery. Sealing writes the batch file first and deletes
the journal second; a journal whose batch file exists already is just deleted, so an
item never lands in two batches.

The quota counts every byte here. When an append goes over it, the oldest sealed
batches are deleted (never the one being uploaded) and their items counted as
evicted. An item larger than a batch may hold is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from device_agent.slots import atomic_write
from device_agent.wire import Capture, ProtocolError, default_of

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # the upload contract's largest body
BODY_OVERHEAD = 512  # the body's header and framing around the items
JOURNAL = "open.jsonl"
POLICY = "policy.json"


@dataclass
class _Journal:
    batch_id: str
    sha256: str
    opened: float  # time.monotonic() when the first item came
    size: int  # bytes of item lines (with their separators)
    items: int


@dataclass(frozen=True)
class Appended:
    """What storing one item did."""

    stored: bool  # False: larger than a batch may hold
    evicted: int = 0  # items of older batches deleted to stay in the quota
    sealed: bool = False  # the open batch was sealed first (a new upload is waiting)


@dataclass(frozen=True)
class Pending:
    """A sealed batch waiting for upload."""

    name: str
    batch_id: str
    items: int


@dataclass(frozen=True)
class PolicyState:
    """What ``policy.json`` holds: the policy to sample by (None: off) and where batches go."""

    capture: Capture | None = None
    upload_url: str | None = None


def batch_name(batch_id: str, items: int) -> str:
    return f"{batch_id}.{items}.json"


def parse_name(name: str) -> Pending | None:
    parts = name.split(".")
    if len(parts) != 3 or parts[2] != "json" or not parts[1].isdigit():
        return None
    return Pending(name, parts[0], int(parts[1]))


def body(device_id: str, batch_id: str, sha256: str, lines: list[bytes]) -> bytes:
    """The upload body around already-encoded item lines (no re-encoding of the payloads)."""
    head = json.dumps(
        {"device_id": device_id, "batch_id": batch_id, "model_sha256": sha256}, separators=(",", ":")
    ).encode()
    return head[:-1] + b',"items":[' + b",".join(lines) + b"]}"


class CaptureStore:
    """The capture directory; thread-safe (the writer thread appends, the uploader reads and deletes)."""

    def __init__(self, root: Path, device_id: str, new_batch_id: Callable[[], str]) -> None:
        self.root = Path(root)
        self.device_id = device_id
        self.new_batch_id = new_batch_id
        self.batches = self.root / "batches"
        self.batches.mkdir(parents=True, exist_ok=True)
        self.quota_bytes: int = default_of(Capture, "quota_bytes")
        self.in_flight: str | None = None  # the batch being uploaded: never evicted under it
        self._lock = threading.Lock()
        self._journal: _Journal | None = None
        self._fh: IO[bytes] | None = None
        self._sizes: dict[str, int] = {}
        for entry in self.batches.iterdir():
            if entry.name.startswith("."):  # a temp file of a write a crash cut short
                with contextlib.suppress(OSError):
                    entry.unlink()
            elif parse_name(entry.name) is not None:
                with contextlib.suppress(OSError):
                    self._sizes[entry.name] = entry.stat().st_size
        self.recovered = self._recover()

    # -- policy ------------------------------------------------------------------

    def load_policy(self) -> PolicyState:
        path = self.root / POLICY
        try:
            doc = json.loads(path.read_bytes())
            capture = Capture.from_dict(doc["capture"]) if doc.get("capture") else None
            url = doc.get("upload_url")
            return PolicyState(capture, url if isinstance(url, str) and url else None)
        except FileNotFoundError:
            return PolicyState()
        except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
            log.warning("%s: unreadable %s ignored: %s", self.device_id, path, exc)
            return PolicyState()

    def save_policy(self, state: PolicyState) -> None:
        doc = {"capture": state.capture.to_dict() if state.capture else None, "upload_url": state.upload_url}
        atomic_write(self.root / POLICY, json.dumps(doc).encode())

    # -- the writer's side -------------------------------------------------------

    def max_batch_bytes(self) -> int:
        """A batch's largest body: the contract's limit, and at most a quarter of the quota, so
        eviction always has older batches to take before the newest data."""
        return max(4096, min(MAX_BODY, self.quota_bytes // 4))

    def append(self, sha256: str, line: bytes) -> Appended:
        """Store one encoded item of ``sha256``'s."""
        limit = self.max_batch_bytes()
        if len(line) + 1 + BODY_OVERHEAD > limit:
            return Appended(stored=False)
        with self._lock:
            j, sealed = self._journal, False
            if j is not None and (j.sha256 != sha256 or j.size + len(line) + 1 + BODY_OVERHEAD > limit):
                self._seal()
                sealed = True
            if self._journal is None or self._fh is None:
                self._open(sha256)
            assert self._journal is not None and self._fh is not None
            self._fh.write(line + b"\n")
            self._journal.size += len(line) + 1
            self._journal.items += 1
            return Appended(stored=True, evicted=self._fit(), sealed=sealed)

    def flush(self) -> None:
        """Hand what was appended to the OS: from here on a crash of the agent does not lose it
        (a power cut may still tear the last line; recovery drops it)."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()

    def seal_if_older(self, age_s: float) -> bool:
        """Seal the open batch if its first item is older than ``age_s``; True if one was sealed."""
        with self._lock:
            j = self._journal
            if j is None or time.monotonic() - j.opened < age_s:
                return False
            self._seal()
            return True

    def seal(self) -> bool:
        with self._lock:
            if self._journal is None:
                return False
            self._seal()
            return True

    def set_quota(self, quota_bytes: int) -> int:
        """Apply a new quota; the items evicted to meet it."""
        with self._lock:
            self.quota_bytes = quota_bytes
            return self._fit()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                with contextlib.suppress(OSError):
                    self._fh.close()
                self._fh = None
            self._journal = None  # the file stays: the next start recovers it

    def _open(self, sha256: str) -> None:
        if (self.root / JOURNAL).exists():  # one a close() left behind: never truncate its items
            self._seal_file(self.root / JOURNAL)
        j = _Journal(self.new_batch_id(), sha256, time.monotonic(), 0, 0)
        fh = open(self.root / JOURNAL, "wb")  # noqa: SIM115 - held open across appends, closed on seal
        try:
            fh.write(json.dumps({"batch_id": j.batch_id, "model_sha256": sha256}).encode() + b"\n")
            fh.flush()
        except BaseException:
            fh.close()
            raise
        self._journal, self._fh = j, fh

    def _seal(self) -> None:
        """Journal -> batch file (atomic), then forget the journal. The caller holds the lock."""
        j, fh = self._journal, self._fh
        self._journal, self._fh = None, None
        if fh is not None:
            fh.close()
        if j is not None:
            self._seal_file(self.root / JOURNAL)

    def _seal_file(self, path: Path) -> int:
        """Turn the journal at ``path`` into a sealed batch; the items it held (0: nothing to keep)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return 0
        lines = raw.split(b"\n")
        try:
            head = json.loads(lines[0])
            batch_id, sha = str(head["batch_id"]), str(head["model_sha256"])
        except (ValueError, KeyError, TypeError, IndexError):
            log.warning("%s: capture journal without a readable header dropped", self.device_id)
            path.unlink(missing_ok=True)
            return 0
        items = [line for line in lines[1:] if _whole(line)]
        done = any(p.batch_id == batch_id for p in map(parse_name, self._sizes) if p is not None)
        if items and not done:
            name = batch_name(batch_id, len(items))
            data = body(self.device_id, batch_id, sha, items)
            atomic_write(self.batches / name, data)
            self._sizes[name] = len(data)
        path.unlink(missing_ok=True)
        return len(items)

    def _recover(self) -> int:
        """Seal a journal a stopped or crashed agent left behind; the items it held."""
        with self._lock:
            return self._seal_file(self.root / JOURNAL)

    def _fit(self) -> int:
        """Delete the oldest batches (not the one in flight) until the store fits its quota."""
        used = sum(self._sizes.values()) + (self._journal.size if self._journal else 0)
        evicted = 0
        for name in sorted(self._sizes):
            if used <= self.quota_bytes:
                break
            if name == self.in_flight:
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.batches / name).unlink()
            used -= self._sizes.pop(name)
            p = parse_name(name)
            evicted += p.items if p else 0
        return evicted

    # -- the uploader's side -----------------------------------------------------

    def pending(self) -> list[Pending]:
        with self._lock:
            return [p for p in map(parse_name, sorted(self._sizes)) if p is not None]

    def read(self, p: Pending) -> bytes | None:
        """The batch's body, marked in flight; None if it was evicted meanwhile."""
        with self._lock:
            if p.name not in self._sizes:
                return None
            self.in_flight = p.name
        try:
            return (self.batches / p.name).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._sizes.pop(p.name, None)
            return None

    def done(self, p: Pending) -> None:
        """The batch was delivered (or refused for good): delete it."""
        with self._lock:
            self._sizes.pop(p.name, None)
            if self.in_flight == p.name:
                self.in_flight = None
            with contextlib.suppress(FileNotFoundError):
                (self.batches / p.name).unlink()

    def release(self) -> None:
        with self._lock:
            self.in_flight = None

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values()) + (self._journal.size if self._journal else 0)


def _whole(line: bytes) -> bool:
    """A journal line that parses: the last one may be torn by a power cut."""
    if not line:
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


__all__ = [
    "BODY_OVERHEAD",
    "MAX_BODY",
    "Appended",
    "CaptureStore",
    "Pending",
    "PolicyState",
    "batch_name",
    "body",
    "parse_name",
]

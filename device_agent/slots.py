"""A/B model slots on disk and the agent's durable state (``state.json``).

Two slot directories (``slots/a``, ``slots/b``): a new model is always written
into the slot that is NOT serving, so the serving model is never touched and
the previous model stays on disk for an instant rollback. ``state.json`` says
which slot is active, what each slot holds (sha256 + signed manifest) and the
last directive seq applied; it is replaced atomically (temp file, fsync,
rename, fsync dir) so a power cut leaves either the old or the new state.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from device_agent.deployment import Outcome
from device_agent.probation import ProbationRecord
from signing.manifest import ENVELOPE_NAME, BundleManifest

SLOT_NAMES = ("a", "b")
STATE_FILE = "state.json"


@dataclass
class SlotInfo:
    """What one slot holds: the model file and the release-signed manifest vouching for it."""

    sha256: str
    length: int
    file: str  # file name inside the slot dir (manifest.files[0].path)
    name: str
    version: str
    target: str
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: BundleManifest) -> SlotInfo:
        entry = manifest.model_file
        return cls(
            entry.sha256,
            entry.length,
            entry.path,
            manifest.name,
            manifest.version,
            manifest.target,
            manifest.to_dict(),
        )


@dataclass
class AgentState:
    active: str | None = None
    slots: dict[str, SlotInfo | None] = field(default_factory=lambda: dict.fromkeys(SLOT_NAMES))
    last_seq: int = 0
    # A swap still on probation, written in the same atomic save as the activation, so a power
    # cut mid-probation resumes (or reverts) it.
    probation: ProbationRecord | None = None
    # The outcome of the last directive, so a restarted agent reports the truth.
    deployment: Outcome | None = None

    def to_dict(self) -> dict[str, Any]:
        """For ``json.dumps`` at once (the state file): a slot's manifest is the state's own dict,
        not a copy. ``dataclasses.asdict`` deep-copied it on every save, most of a save's CPU
        besides the encoding, and a simulated fleet saves hundreds of times a rollout."""
        return {
            "active": self.active,
            "last_seq": self.last_seq,
            "slots": {k: (_fields_of(v) if v else None) for k, v in self.slots.items()},
            "probation": self.probation.to_dict() if self.probation else None,
            "deployment": self.deployment.to_dict() if self.deployment else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentState:
        slots: dict[str, SlotInfo | None] = dict.fromkeys(SLOT_NAMES)
        for name, info in (data.get("slots") or {}).items():
            if name in SLOT_NAMES and info:
                slots[name] = SlotInfo(**info)
        active = data.get("active")
        return cls(
            active=active if active in SLOT_NAMES else None,
            slots=slots,
            last_seq=int(data.get("last_seq", 0)),
            probation=ProbationRecord.from_dict(data.get("probation")),
            deployment=Outcome.from_dict(data.get("deployment")),
        )


def _fields_of(info: SlotInfo) -> dict[str, Any]:
    return {f.name: getattr(info, f.name) for f in fields(info)}


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """An OSError saying the filesystem (or our quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def atomic_write(path: Path, data: bytes) -> None:
    """Write temp, fsync, rename over ``path``, fsync the directory.

    If anything fails before the rename (a full disk), the temp file is removed and
    ``path`` is untouched: the old content stays, whole.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class SlotStore:
    """The slot directories and state file under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.state_path = self.data_dir / STATE_FILE
        for name in SLOT_NAMES:
            self.slot_dir(name).mkdir(parents=True, exist_ok=True)
        self.state = self._load()

    def _load(self) -> AgentState:
        if not self.state_path.exists():
            return AgentState()
        try:
            return AgentState.from_dict(json.loads(self.state_path.read_bytes()))
        except (ValueError, TypeError, KeyError):
            # A corrupt state file must not brick the device: start empty, the retained
            # directive brings it back to the desired model.
            broken = self.state_path.with_suffix(".corrupt")
            with contextlib.suppress(OSError):
                os.replace(self.state_path, broken)
            return AgentState()

    def save(self) -> None:
        atomic_write(self.state_path, json.dumps(self.state.to_dict(), indent=2).encode())

    @contextlib.contextmanager
    def _change(self) -> Iterator[AgentState]:
        """Mutate the state and save it; if the save fails (disk full), memory goes back too,
        so what the agent believes never differs from what a reboot would read."""
        before = copy.deepcopy(self.state)
        try:
            yield self.state
            self.save()
        except BaseException:
            self.state = before
            raise

    def discard_unrecorded(self, name: str) -> int:
        """Delete whatever slot ``name`` holds that ``state.json`` does not vouch for (partial
        downloads, an uncommitted model); return the bytes freed. Never touches the active slot."""
        if name == self.state.active or self.state.slots.get(name) is not None:
            return 0
        freed = 0
        for entry in list(self.slot_dir(name).iterdir()):
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    freed += entry.stat().st_size
                    entry.unlink()
        return freed

    def slot_dir(self, name: str) -> Path:
        return self.data_dir / "slots" / name

    @property
    def inactive(self) -> str:
        return "b" if self.state.active == "a" else "a"

    def model_path(self, name: str) -> Path | None:
        info = self.state.slots.get(name)
        return self.slot_dir(name) / info.file if info else None

    def find(self, sha256: str) -> str | None:
        """The slot holding ``sha256``, preferring the active one."""
        order = [self.state.active, self.inactive] if self.state.active else list(SLOT_NAMES)
        for name in order:
            info = self.state.slots.get(name) if name else None
            if info is not None and info.sha256 == sha256:
                return name
        return None

    def partial_path(self, name: str, sha256: str) -> Path:
        return self.slot_dir(name) / f"{sha256}.part"

    def prepare(self, name: str, keep_partial_for: str) -> None:
        """Empty slot ``name`` for a new model, keeping a partial download of the same model."""
        if name == self.state.active:
            raise ValueError("refusing to overwrite the active slot")
        keep = self.partial_path(name, keep_partial_for).name
        with self._change() as state:  # forget the slot's old content before deleting its files
            state.slots[name] = None
        for entry in self.slot_dir(name).iterdir():
            if entry.name == keep:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def commit(self, name: str, partial: Path, envelope: bytes, manifest: BundleManifest) -> SlotInfo:
        """Move a verified download into place and record it (the slot is not active yet)."""
        info = SlotInfo.from_manifest(manifest)
        slot = self.slot_dir(name)
        atomic_write(slot / ENVELOPE_NAME, envelope)
        os.replace(partial, slot / info.file)
        with self._change() as state:
            state.slots[name] = info
        return info

    def activate(
        self,
        name: str,
        seq: int | None = None,
        *,
        probation: ProbationRecord | None = None,
        deployment: Outcome | None = None,
    ) -> None:
        """Make ``name`` the serving slot; probation/outcome records go in the same atomic write."""
        with self._change() as state:
            state.active = name
            if seq is not None:
                state.last_seq = max(state.last_seq, seq)
            state.probation = probation
            if deployment is not None:
                state.deployment = deployment

    def record_seq(self, seq: int) -> None:
        if seq > self.state.last_seq:
            with self._change() as state:
                state.last_seq = seq

    def record_outcome(self, outcome: Outcome, *, end_probation: bool = False) -> None:
        """Persist the result of directive ``outcome.seq`` (and that it was handled)."""
        with self._change() as st:
            st.last_seq = max(st.last_seq, outcome.seq)
            st.deployment = outcome
            if end_probation:
                st.probation = None

    def set_probation(self, probation: ProbationRecord | None) -> None:
        with self._change() as state:
            state.probation = probation

    def slot_hashes(self) -> dict[str, str | None]:
        return {k: (v.sha256 if v else None) for k, v in self.state.slots.items()}

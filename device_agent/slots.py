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
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    # A swap still on probation: {"seq", "slot", "previous", "sha256", "params", "boots"}. Written in
    # the same atomic save as the activation, so a power cut mid-probation resumes (or reverts) it.
    probation: dict[str, Any] | None = None
    # The outcome of the last directive ({"seq", "state", "error"}), so a restarted agent reports the truth.
    deployment: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "last_seq": self.last_seq,
            "slots": {k: (asdict(v) if v else None) for k, v in self.slots.items()},
            "probation": self.probation,
            "deployment": self.deployment,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentState:
        slots: dict[str, SlotInfo | None] = dict.fromkeys(SLOT_NAMES)
        for name, info in (data.get("slots") or {}).items():
            if name in SLOT_NAMES and info:
                slots[name] = SlotInfo(**info)
        active = data.get("active")
        probation = data.get("probation")
        deployment = data.get("deployment")
        return cls(
            active=active if active in SLOT_NAMES else None,
            slots=slots,
            last_seq=int(data.get("last_seq", 0)),
            probation=probation if isinstance(probation, dict) else None,
            deployment=deployment if isinstance(deployment, dict) else None,
        )


def atomic_write(path: Path, data: bytes) -> None:
    """Write temp, fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
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
        self.state.slots[name] = None
        self.save()  # forget the slot's old content before deleting its files
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
        self.state.slots[name] = info
        self.save()
        return info

    def activate(
        self,
        name: str,
        seq: int | None = None,
        *,
        probation: dict[str, Any] | None = None,
        deployment: dict[str, Any] | None = None,
    ) -> None:
        """Make ``name`` the serving slot; probation/outcome records go in the same atomic write."""
        self.state.active = name
        if seq is not None:
            self.state.last_seq = max(self.state.last_seq, seq)
        self.state.probation = probation
        if deployment is not None:
            self.state.deployment = deployment
        self.save()

    def record_seq(self, seq: int) -> None:
        if seq > self.state.last_seq:
            self.state.last_seq = seq
            self.save()

    def record_outcome(self, seq: int, state: str, error: str | None = None) -> None:
        """Persist the result of directive ``seq`` (and that it was handled)."""
        self.state.last_seq = max(self.state.last_seq, seq)
        self.state.deployment = {"seq": seq, "state": state, "error": error}
        self.save()

    def set_probation(self, probation: dict[str, Any] | None) -> None:
        self.state.probation = probation
        self.save()

    def slot_hashes(self) -> dict[str, str | None]:
        return {k: (v.sha256 if v else None) for k, v in self.state.slots.items()}

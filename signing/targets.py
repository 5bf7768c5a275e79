"""What edgefleet signs about each released bundle in TUF targets metadata, and the revocation floors.

python-tuf verifies hashes and lengths and leaves a target's ``custom`` field to
us: there the release keys vouch for the hardware ids a bundle is built for, its
release counter and its model family. The per-family revocation floors ride in
the same release-signed targets metadata, as the ``custom`` field of one
reserved target, so they get TUF's rollback and freeze protection for free and a
device reads them without an extra download.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signing.errors import MalformedTargetInfo

FLOORS_TARGET = "_edgefleet/revocation-floors.json"
"""Reserved target path whose ``custom["floors"]`` maps model family -> lowest allowed release."""


@dataclass(frozen=True)
class TargetCustom:
    """The release-signed facts a device checks before installing a target."""

    family: str
    release: int
    hardware_ids: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        fields = {"family": self.family, "release": self.release, "hardware_ids": self.hardware_ids}
        return {**self.extra, **fields}

    @classmethod
    def from_custom(cls, custom: Any, path: str) -> TargetCustom:
        """Parse a target's custom field; MalformedTargetInfo names what is wrong."""
        if not isinstance(custom, Mapping):
            raise MalformedTargetInfo(f"target {path!r} has no edgefleet custom fields")
        family, release, hw = custom.get("family"), custom.get("release"), custom.get("hardware_ids")
        if not isinstance(family, str) or not family:
            raise MalformedTargetInfo(f"target {path!r}: custom.family must be a non-empty string")
        if not isinstance(release, int) or isinstance(release, bool) or release < 0:
            raise MalformedTargetInfo(f"target {path!r}: custom.release must be a non-negative integer")
        if not isinstance(hw, list) or not hw or not all(isinstance(h, str) and h for h in hw):
            raise MalformedTargetInfo(f"target {path!r}: custom.hardware_ids must list hardware id strings")
        extra = {k: v for k, v in custom.items() if k not in ("family", "release", "hardware_ids")}
        return cls(family, release, list(hw), extra)


def parse_floors(custom: Any) -> dict[str, int]:
    """Parse the floors target's custom field into {family: floor}."""
    floors = custom.get("floors") if isinstance(custom, Mapping) else None
    if not isinstance(floors, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in floors.items()
    ):
        raise MalformedTargetInfo(f"{FLOORS_TARGET}: custom.floors must map family -> non-negative integer")
    return dict(floors)


@dataclass(frozen=True)
class VerifiedTarget:
    """A target python-tuf verified (signatures, versions, expiry) plus our custom fields.

    ``path`` is where the bytes were written, or None when only the metadata was resolved.
    """

    name: str
    length: int
    sha256: str
    custom: TargetCustom
    floors: dict[str, int]
    path: Path | None = None
    root_version: int = 0

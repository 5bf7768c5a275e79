"""The install decision's trust checks, as pure functions (Uptane's director / image split).

The directive (signed by the online fleet key) says *which* bytes this device
should run; the targets metadata (signed by offline release keys) says *what*
those bytes are. A device installs only when both agree, so a stolen fleet key
alone can point devices only at releases a release key already vouched for, and
never below a family's signed revocation floor. A fleet rollback to an older
release that is still above the floor is simply a newer directive.
"""

from __future__ import annotations

from collections.abc import Mapping

from signing.errors import DirectiveMismatch, HardwareMismatch, RevokedRelease
from signing.targets import VerifiedTarget


def check_agreement(
    target: VerifiedTarget, *, directive_sha256: str, directive_length: int, hardware_id: str
) -> None:
    """Raise unless the directive's hash and length equal the release metadata's and the hardware fits."""
    if directive_sha256.lower() != target.sha256.lower():
        raise DirectiveMismatch(
            f"{target.name}: directive sha256 {directive_sha256[:12]}..., "
            f"release metadata {target.sha256[:12]}..."
        )
    if directive_length != target.length:
        raise DirectiveMismatch(
            f"{target.name}: directive length {directive_length}, release metadata {target.length}"
        )
    if hardware_id not in target.custom.hardware_ids:
        raise HardwareMismatch(
            f"{target.name} is built for {', '.join(target.custom.hardware_ids)}, not {hardware_id}"
        )


def check_floor(target: VerifiedTarget, floors: Mapping[str, int] | None = None) -> None:
    """Raise RevokedRelease when the target's release counter is below its family's signed floor.

    ``floors`` defaults to the floors delivered with the target; an agent may pass
    the higher of those and the floors it stored earlier, so a floor never goes down.
    """
    floors = target.floors if floors is None else floors
    floor = floors.get(target.custom.family, 0)
    if target.custom.release < floor:
        raise RevokedRelease(
            f"{target.name}: release {target.custom.release} of {target.custom.family!r} "
            f"is below the floor {floor}"
        )


def merge_floors(stored: Mapping[str, int], delivered: Mapping[str, int]) -> dict[str, int]:
    """Floors only rise: the per-family maximum of what the device stored and what was just delivered."""
    out = dict(stored)
    for family, floor in delivered.items():
        out[family] = max(out.get(family, 0), floor)
    return out

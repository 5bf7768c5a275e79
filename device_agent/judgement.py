"""Judging what the fleet asks of this device, before any work is done: accept, or refuse and say why.

Pure functions over typed inputs (bytes, keys, the device's identity, the newest
directive it accepted, the time): no I/O, so the rules are tested by themselves
and the agent shell only carries out the verdict. Two stages, as Uptane splits
them:

- :func:`judge` takes a ``desired`` message: the fleet key's signature (possibly
  after walking the TUF root chain to learn a rotated key), the payload's shape,
  then :func:`judge_directive` on the decoded directive (device id, seq, expiry);
- :func:`check_manifest` holds an accepted directive to the release-signed
  bundle manifest (hash, length, hardware id, target), and :func:`check_target`
  and :func:`check_disk` to what this device can run and store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from device_agent.wire import (
    DIRECTIVE_PAYLOAD_TYPE,
    MAX_PAYLOAD,
    Directive,
    ModelRef,
    ProtocolError,
    ReasonCode,
    decode_directive,
)
from signing.dsse import verify_envelope
from signing.errors import CodedError, TrustError, Unavailable, UnknownKey
from signing.keys import PublicKey
from signing.manifest import BundleManifest

DETAIL_MAX = 500  # characters of detail kept in a Rejection (the reported snapshot stays small)


@dataclass(frozen=True)
class Mark:
    """The newest directive this device accepted: its seq and the digest of its signed payload.

    ``digest`` is None when the seq is known from disk only: the same retained
    directive delivered again after a restart is then still recognised by its seq.
    """

    seq: int = 0
    digest: str | None = None

    @classmethod
    def restored(cls, done: int, accepted: int | None = None) -> Mark:
        """After a restart: ``done`` is the newest seq the slots recorded an outcome for,
        ``accepted`` the newest the trust state saw accepted (TUF mode).

        A directive accepted before a crash or power loss but never finished must run
        again when its retained message comes back, while every older one stays refused.
        """
        if accepted is not None and accepted > done:
            accepted -= 1
        return cls(max(done, accepted or 0))


@dataclass(frozen=True)
class Accept:
    directive: Directive
    mark: Mark  # the new newest accepted directive


@dataclass(frozen=True)
class Reject:
    seq: int  # 0 when the payload could not be read far enough to know it
    reason: ReasonCode | str
    detail: str
    malformed: bool = False  # not a directive at all (counted apart from refusals)


@dataclass(frozen=True)
class Duplicate:
    """The directive accepted last, delivered again (a reconnect or restart): already handled."""

    seq: int


@dataclass(frozen=True)
class RefreshRoot:
    """Signed by a key the trusted root does not know: after a rotation only a newer root can vouch
    for it, so walk the root chain and judge the same payload again."""

    cause: UnknownKey


Verdict = Accept | Reject | Duplicate | RefreshRoot


@dataclass(frozen=True)
class RootWalk:
    """Where a payload signed by an unknown key stands with the TUF root chain."""

    possible: bool = False  # TUF mode and not yet walked for this payload
    failure: CodedError | None = None  # what refused the walk, once it was tried


@dataclass(frozen=True)
class Refusal:
    """Why an accepted directive cannot be carried out on this device."""

    reason: ReasonCode
    detail: str


@dataclass(frozen=True)
class DeviceFit:
    """What this device is and can run, for holding a release to it."""

    hardware_id: str
    targets: tuple[str, ...]  # the targets it was provisioned for
    runnable: frozenset[str]  # of those, what its runtime can load
    why_not: Callable[[str], str] = field(default=lambda target: f"this runtime cannot run {target}")


def judge(
    payload: bytes,
    *,
    keys: Mapping[str, PublicKey],
    device_id: str,
    mark: Mark,
    now: datetime,
    root: RootWalk = RootWalk(),
) -> Verdict:
    """The verdict on one ``desired`` message (a DSSE envelope around a Directive)."""
    if len(payload) > MAX_PAYLOAD:
        return Reject(0, ReasonCode.MALFORMED_ENVELOPE, f"{len(payload)} bytes exceed {MAX_PAYLOAD}", True)
    try:
        body = verify_envelope(payload, DIRECTIVE_PAYLOAD_TYPE, keys)
    except TrustError as exc:
        return judge_signature(exc, root)
    try:
        directive = decode_directive(body)
    except ProtocolError as exc:
        return Reject(0, ReasonCode.MALFORMED_DIRECTIVE, str(exc)[:DETAIL_MAX], True)
    return judge_directive(
        directive, hashlib.sha256(body).hexdigest(), device_id=device_id, mark=mark, now=now
    )


def judge_signature(exc: TrustError, root: RootWalk) -> Reject | RefreshRoot:
    """The verdict when the fleet signature did not verify."""
    if isinstance(exc, UnknownKey):
        if root.possible:
            return RefreshRoot(exc)
        failure = root.failure
        if failure is not None and not isinstance(failure, Unavailable):
            # The repository offered a root (or metadata) the chain does not vouch for, e.g.
            # a root signed by a retired root key: that refusal is the one to report.
            return Reject(0, failure.code, f"{exc}; root refresh refused: {failure}")
        return Reject(0, exc.code, f"{exc}" + (f"; {failure}" if failure is not None else ""))
    return Reject(0, exc.code, str(exc), malformed=exc.code == ReasonCode.MALFORMED_ENVELOPE)


def judge_directive(
    directive: Directive, digest: str, *, device_id: str, mark: Mark, now: datetime
) -> Verdict:
    """A signed directive: for this device, newer than the last one accepted, not expired."""
    if directive.device_id != device_id:
        return Reject(directive.seq, ReasonCode.WRONG_DEVICE, f"directive is for {directive.device_id!r}")
    if directive.seq <= mark.seq:
        if directive.seq == mark.seq and mark.digest in (None, digest):
            return Duplicate(directive.seq)
        return Reject(directive.seq, ReasonCode.STALE_SEQUENCE, f"seq {directive.seq} <= applied {mark.seq}")
    if directive.expires_at <= now:
        return Reject(directive.seq, ReasonCode.EXPIRED, f"expired at {directive.expires_at.isoformat()}")
    return Accept(directive, Mark(directive.seq, digest))


def check_target(target: str, fit: DeviceFit) -> Refusal | None:
    if target in fit.targets and target in fit.runnable:
        return None
    return Refusal(
        ReasonCode.UNSUPPORTED_TARGET, f"device runs {list(fit.targets)}, not {target}: {fit.why_not(target)}"
    )


def check_manifest(ref: ModelRef, manifest: BundleManifest, fit: DeviceFit) -> Refusal | None:
    """Director/image agreement (Uptane): the directive may only point at what a release key signed."""
    entry = manifest.model_file
    if entry.sha256 != ref.sha256 or entry.length != ref.length:
        return Refusal(ReasonCode.DIRECTIVE_MISMATCH, "directive hash/length differ from the signed manifest")
    if fit.hardware_id not in manifest.hardware_ids:
        return Refusal(ReasonCode.HARDWARE_MISMATCH, f"{fit.hardware_id} not in {manifest.hardware_ids}")
    return check_target(manifest.target, fit)


def check_disk(*, free: int, have: int, length: int, reserve: int) -> Refusal | None:
    """Room for the rest of a download (``have`` bytes of ``length`` already on disk) plus a reserve."""
    need = length - have + reserve
    if free < need:
        return Refusal(
            ReasonCode.INSUFFICIENT_DISK, f"{free} bytes free, need {need} (model {length} + reserve)"
        )
    return None


__all__ = [
    "Accept",
    "DeviceFit",
    "Duplicate",
    "Mark",
    "RefreshRoot",
    "Refusal",
    "Reject",
    "RootWalk",
    "Verdict",
    "check_disk",
    "check_manifest",
    "check_target",
    "judge",
    "judge_directive",
    "judge_signature",
]

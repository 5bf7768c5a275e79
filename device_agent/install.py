"""Getting the model a directive names verified into a slot, ready to load.

The order of the steps is the security argument, so it lives in one place:

1. the device can run the target at all;
2. TUF mode: the release metadata lists the model and agrees with the directive
   (hash, length, hardware id) and it clears its family's revocation floor;
3. a slot already holding the model is re-hashed and reused (a rollback or a
   promoted shadow candidate downloads nothing); otherwise
4. the bundle envelope is fetched and its release signature verified, the signed
   manifest must agree with the directive (:func:`judgement.check_manifest`), the
   disk must have room, and only then is the model streamed into the inactive
   slot (resumable, bounded, hashed on the fly) and committed.

Each step announces itself through ``move`` (the deployment state machine), and
every refusal is a :class:`signing.errors.CodedError` naming its reason. A fetch
that finds the server away is retried with backoff until ``delivery_retry_s``
has passed (:func:`retrying`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import quote

from device_agent import mirrors
from device_agent.config import AgentConfig
from device_agent.delta import DeltaFetcher, DeltaResult, Fallback, install_from_delta
from device_agent.deployment import Trigger
from device_agent.errors import InstallError
from device_agent.judgement import DETAIL_MAX, DeviceFit, Refusal, check_disk, check_manifest, check_target
from device_agent.mqtt_link import backoff_delay
from device_agent.ports import Admission, Fetcher
from device_agent.slots import SlotStore, atomic_write
from device_agent.wire import ModelRef, ReasonCode
from signing.errors import DigestMismatch, LengthMismatch, MetadataExpired, TrustError, Unavailable
from signing.keys import PublicKey
from signing.manifest import BundleManifest, FileEntry, manifest_from_envelope, verify_file

if TYPE_CHECKING:
    from device_agent.trust_state import TrustStore

log = logging.getLogger(__name__)

_R = TypeVar("_R")


class Move(Protocol):
    """Announce a step: (trigger, detail). The bytes an install fetched are counted in
    ``Installer.bytes_fetched``, which the reconciler puts on the event that ends the install."""

    def __call__(self, trigger: Trigger, detail: str | None, /) -> Awaitable[None]: ...


def refuse(refusal: Refusal | None) -> None:
    if refusal is not None:
        raise InstallError(refusal.reason, refusal.detail)


async def retrying(
    call: Callable[[], Awaitable[_R]],
    *,
    budget_s: float,
    what: str,
    who: str,
    base: float = 0.5,
    admission: Admission | None = None,
) -> _R:
    """``call()`` again after an :class:`Unavailable`, with backoff and full jitter, until ``budget_s``
    have passed since the first try; then the last error propagates. Any other error propagates at once.

    A budget in time, not in attempts: with full jitter a fixed number of attempts
    is a random time (6 attempts were 0-12.5 s, and a 4 s server restart failed
    14% of the devices caught mid-fetch), while a restart or failover lasts seconds
    whatever the dice say. Progress made meanwhile (a resumed download) is kept.

    ``admission``: each attempt takes a turn (:class:`device_agent.ports.Admission`), the backoff
    sleeps do not hold one, so a source that is down does not keep other installs from theirs; the
    budget starts when the first turn is granted (waiting for it is not trying).
    """
    turn: Admission = admission if admission is not None else contextlib.nullcontext()
    deadline: float | None = None
    attempt = 0
    while True:
        try:
            async with turn:
                if deadline is None:
                    deadline = time.monotonic() + budget_s
                return await call()
        except Unavailable as exc:
            assert deadline is not None  # set before the call could raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.info("%s: %s failed (%s); retrying", who, what, exc)
            await asyncio.sleep(min(left, backoff_delay(attempt, base=base, cap=5.0)))
            attempt += 1


class Installer:
    """The install steps of one agent; the agent passes each call its ``move`` for the directive at hand."""

    def __init__(
        self,
        config: AgentConfig,
        slots: SlotStore,
        fetcher: Fetcher,
        *,
        release_keys: Callable[[], Mapping[str, PublicKey]],
        fit: Callable[[], DeviceFit],
        trust_store: TrustStore | None,
        now: Callable[[], datetime],
        clock: Callable[[], float],
        admission: Admission | None = None,
    ) -> None:
        self.config, self.slots, self.fetcher = config, slots, fetcher
        self.admission = admission  # a turn per fetch attempt (the simulator's shared core)
        self.release_keys, self.fit, self.trust_store = release_keys, fit, trust_store
        self.now, self.clock = now, clock
        self.who = config.device_id
        self.bytes_fetched = 0  # bytes the current install fetched (the caller resets it per directive)
        self._preferred: str | None = None  # the mirror that delivered last
        self._mirror_of: dict[str, str] = {}  # a URL composed on a mirror -> that mirror

    async def install(self, ref: ModelRef, move: Move) -> tuple[str, Path]:
        """Get ``ref`` verified into a slot (reusing one that already holds it); return (slot, path)."""
        refuse(check_target(ref.target, self.fit()))
        if self.trust_store is not None:
            await self._check_release(ref, self.trust_store, move)
        slot = self.slots.find(ref.sha256)
        if slot is None:
            return await self._download(ref, move)
        await move(Trigger.VERIFY, f"model already in slot {slot}")
        info = self.slots.state.slots[slot]
        assert info is not None
        refuse(check_manifest(ref, BundleManifest.from_dict(info.manifest), self.fit()))
        path = self.slots.slot_dir(slot) / info.file
        await asyncio.to_thread(verify_file, path, FileEntry(info.file, info.sha256, info.length))
        return slot, path

    def _sources(self, direct: str, mirrored: Callable[[str], str]) -> list[str]:
        """Where to fetch one thing from: each mirror in order, else the URL the directive names.

        The mirror that delivered last goes first: once it passed the TUF check, asking the
        mirrors before it (down, or refused) again for the envelope and the model is wasted.
        """
        if not self.config.mirrors:
            return [direct]
        ordered = sorted(self.config.mirrors, key=lambda m: m != self._preferred)
        urls = [mirrored(m) for m in ordered]
        self._mirror_of.update(zip(urls, ordered, strict=True))
        return urls

    async def _check_release(self, ref: ModelRef, store: TrustStore, move: Move) -> None:
        """TUF mode: the release metadata must list ``ref``, agree with the directive, clear the floor."""
        bases = self._sources(mirrors.repository_url(self.config.tuf_url, ref), mirrors.metadata_base)
        if not all(bases):
            raise InstallError(
                ReasonCode.NO_REPOSITORY, "no tuf_url configured and none derivable from the directive"
            )

        def check(base: str) -> Awaitable[None]:
            return asyncio.to_thread(
                self.fetcher.release, store, base, ref, self.config.hardware_id, self.now()
            )

        await move(Trigger.VERIFY, "release metadata (TUF)")
        try:
            await self._retrying(bases, check, what="release metadata check")
        except MetadataExpired as exc:
            # A freeze attack, an offline repository, or this device's clock running ahead:
            # say which time the device judged by, so an operator can tell them apart.
            raise MetadataExpired(
                f"{exc} (device clock {self.now().isoformat(timespec='seconds')}; "
                f"host clock off by {self.clock() - time.time():+.0f} s)"
            ) from exc

    async def _retrying(
        self, sources: list[str], call: Callable[[str], Awaitable[_R]], *, what: str, base: float = 0.5
    ) -> _R:
        """:func:`retrying` over the sources in order (:func:`mirrors.first_of`); when the budget is
        spent with some mirror out of reach, what the others refused is the verdict, not "unavailable"."""

        async def tracked(source: str) -> _R:
            result = await call(source)
            self._preferred = self._mirror_of.get(source, self._preferred)
            return result

        try:
            return await retrying(
                lambda: mirrors.first_of(sources, tracked, who=self.who, what=what),
                budget_s=self.config.delivery_retry_s,
                what=what,
                who=self.who,
                base=base,
                admission=self.admission,
            )
        except mirrors.MirrorsUnavailable as exc:
            if exc.refusal is not None:
                raise exc.refusal from exc
            raise

    async def _download(self, ref: ModelRef, move: Move) -> tuple[str, Path]:
        await move(Trigger.DOWNLOAD, None)

        async def signed_envelope(url: str) -> tuple[bytes, BundleManifest]:
            data = await self.fetcher.envelope(url)  # server away or busy: retried; a refusal (4xx): final
            return data, manifest_from_envelope(data, self.release_keys())  # a bad copy: the next mirror

        envelope, manifest = await self._retrying(
            self._sources(ref.envelope_url, lambda m: mirrors.envelope_url(m, ref.sha256)),
            signed_envelope,
            what="envelope fetch",
        )
        self.bytes_fetched += len(envelope)
        await move(Trigger.VERIFY, "bundle envelope")
        refuse(check_manifest(ref, manifest, self.fit()))
        slot = self.slots.inactive
        self.slots.prepare(slot, keep_partial_for=ref.sha256)
        part = self.slots.partial_path(slot, ref.sha256)
        refuse(
            check_disk(
                free=shutil.disk_usage(self.slots.slot_dir(slot)).free,
                have=part.stat().st_size if part.exists() else 0,
                length=ref.length,
                reserve=self.config.min_free_disk_bytes,
            )
        )
        await move(Trigger.DOWNLOAD, f"model into slot {slot}")
        via = await self._from_delta(ref, part)
        self.bytes_fetched += via.received
        if not via.rebuilt:
            had = part.stat().st_size if part.exists() else 0
            try:
                await self._retrying(
                    self._sources(ref.model_url, lambda m: self._mirrored_model_url(m, ref)),
                    lambda url: self.fetcher.model(url, part, length=ref.length, sha256=ref.sha256),
                    what="download (resuming)",
                    base=0.2,
                )
            finally:  # what came over the link, a failed or resumed download's share included
                with contextlib.suppress(OSError):
                    self.bytes_fetched += max(0, (part.stat().st_size if part.exists() else ref.length) - had)
        await move(Trigger.INSTALL, via.note[:DETAIL_MAX])
        info = self.slots.commit(slot, part, envelope, manifest)
        return slot, self.slots.slot_dir(slot) / info.file

    async def _from_delta(self, ref: ModelRef, part: Path) -> DeltaResult:
        """The verified model at ``part`` rebuilt from a delta against the served model, or why not.

        The base is the active slot's file: the inactive slot was just emptied for
        this install, and the active one is only read."""
        if not self.config.delta_updates:
            return DeltaResult.fallback(Fallback.DISABLED)
        active = self.slots.state.active
        info = self.slots.state.slots.get(active) if active else None
        if not active or info is None:
            return DeltaResult.fallback(Fallback.NO_BASE)
        if not isinstance(self.fetcher, DeltaFetcher):
            return DeltaResult.fallback(Fallback.UNSUPPORTED)
        base = self.slots.slot_dir(active) / info.file
        return await install_from_delta(
            self.fetcher,
            base=base,
            base_sha256=info.sha256,
            ref=ref,
            part=part,
            repository=self._delta_repository(ref),
        )

    def _delta_repository(self, ref: ModelRef) -> str:
        """Where deltas are looked up: the mirror that delivered last (or the first one), whose
        published tree holds the repository's ``targets/deltas/``; without mirrors, the TUF repository.

        One place only: a delta that is missing or bad there costs the full file, which fails over."""
        if self.config.mirrors:  # checked and normalised when the config was loaded
            return mirrors.metadata_base(self._preferred or self.config.mirrors[0])
        return mirrors.repository_url(self.config.tuf_url, ref)

    def _mirrored_model_url(self, mirror: str, ref: ModelRef) -> str:
        """A TUF-mode device fetches the released target (where a TUF client looks for it, and where
        the repository keeps files derived from it); a device without TUF, the bundle's model file."""
        if self.trust_store is None:
            return mirrors.model_url(mirror, ref.sha256)
        from signing.tuf_release import target_name

        return mirrors.target_url(mirror, target_name(ref.name, ref.version), ref.sha256)

    async def small_file(self, ref: ModelRef, slot: str, entry: FileEntry) -> bytes:
        """Another (small) signed file of the bundle in ``slot``, the golden set: from the slot when it
        holds it intact, else fetched beside the model file and kept there. Checked against ``entry``
        (from the release-signed manifest) either way."""
        path = self.slots.slot_dir(slot) / entry.path
        if path.is_file():
            try:
                await asyncio.to_thread(verify_file, path, entry)
                return path.read_bytes()
            except TrustError:
                log.warning(
                    "%s: %s in slot %s does not match its signed entry; fetching it",
                    self.who,
                    entry.path,
                    slot,
                )

        async def checked(url: str) -> bytes:
            data = await self.fetcher.envelope(url)
            if len(data) != entry.length:
                raise LengthMismatch(f"{entry.path}: {len(data)} bytes, signed {entry.length}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.sha256:
                raise DigestMismatch(f"{entry.path}: sha256 {digest[:12]}..., signed {entry.sha256[:12]}...")
            return data

        data = await self._retrying(
            self._sources(
                bundle_file_url(ref, entry.path), lambda m: mirrors.bundle_file_url(m, ref.sha256, entry.path)
            ),
            checked,
            what=f"{entry.path} fetch",
        )
        atomic_write(path, data)
        return data


def bundle_file_url(ref: ModelRef, name: str) -> str:
    """Where a bundle's other files are served: beside the model file (``<model_url>/files/<name>``)."""
    return f"{ref.model_url.rstrip('/')}/files/{quote(name)}"


__all__ = ["Installer", "Move", "bundle_file_url", "refuse", "retrying"]

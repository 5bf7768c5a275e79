"""Carrying out accepted directives, one at a time, on the agent's loop.

The :class:`Reconciler` takes the newest accepted directive (an older one still
queued is superseded), waits for its ``not_before``, downloads when its link
allows (a metered link may be held by the directive's rule or a daily budget),
installs its model into the inactive slot (:mod:`~device_agent.install`), holds
it ``staged`` until its maintenance window opens and no app defers it
(:mod:`~device_agent.schedule`), swaps it in, watches a probation
(:func:`device_agent.probation.verdict`) and starts a shadow candidate. Every
change of the deployment state goes through the table in
:mod:`~device_agent.deployment` and is announced (an Event, then the Reported
snapshot); every failure is one ``except CodedError`` that reports its code.

Nothing is swapped until the activation is on disk, and every failure leaves the
serving model untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from device_agent import acceptance, probation, schedule
from device_agent.config import AgentConfig
from device_agent.deployment import Deployment, Trigger
from device_agent.errors import InstallError
from device_agent.input_checks import InputCheck
from device_agent.install import Installer, Move
from device_agent.metrics import Metrics
from device_agent.ports import Admission
from device_agent.probation import Pass, ProbationRecord, Revert
from device_agent.runtime import LoadedModel, RuntimeFactory, RuntimeLoadError
from device_agent.serving import Models, Serving
from device_agent.shadow import Shadow, sample_every
from device_agent.slots import SlotStore, atomic_write, is_disk_full
from device_agent.telemetry import ModelTotals, Telemetry
from device_agent.wire import Directive, Event, ModelRef, ReasonCode, Rejection, Waiting
from signing.errors import CodedError
from signing.manifest import FileEntry, verify_file

log = logging.getLogger(__name__)

PROBATION_POLL = 0.05  # s between probation checks
DETAIL_MAX = 500  # characters of detail kept in the reported snapshot's last rejection
STALL_ENV = "EDGEFLEET_AGENT_STALL"
VERDICT_FILE = "acceptance.json"  # in a slot's directory, beside its model
USAGE_FILE = "link_usage.json"  # in the data directory: bytes fetched on a metered link today
STAGED_FILE = "staged"  # in a slot's directory while its model waits for its window (never served)
MAX_DEFER_S = 7 * 86400.0  # longest deferral one call may ask for (the policy caps what it gets)


def stall_plan() -> dict[str, float]:
    """``EDGEFLEET_AGENT_STALL="warming:5,swapping:5"``: pause after announcing those states (so the
    power-loss tests can kill -9 the agent there)."""
    plan: dict[str, float] = {}
    for item in filter(None, os.environ.get(STALL_ENV, "").split(",")):
        state, _, seconds = item.partition(":")
        with contextlib.suppress(ValueError):
            plan[state.strip()] = float(seconds or 3600)
    return plan


class _Superseded(Exception):
    """A newer directive arrived while this one waited: drop it, take the newer one up."""


class LinkUsage:
    """Bytes fetched on a metered link per local day, kept on disk so a restart does not reset
    the budget (a damaged file counts as nothing used: the budget is a courtesy, not a defence)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.day, self.bytes = "", 0
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            doc = json.loads(path.read_text())
            self.day, self.bytes = str(doc["day"]), max(0, int(doc["bytes"]))

    def today(self, day: str) -> int:
        return self.bytes if day == self.day else 0

    def add(self, day: str, n: int) -> None:
        self.bytes = self.today(day) + n
        self.day = day
        try:
            atomic_write(self.path, json.dumps({"day": day, "bytes": self.bytes}).encode())
        except OSError as exc:  # counted in memory; only a restart would forget it
            log.warning("could not record the link usage: %s", exc)


class Reconciler:
    """The deployment side of one agent: the queue of accepted directives, the state machine's
    record, probation and shadow, and what is reported about them."""

    def __init__(
        self,
        config: AgentConfig,
        slots: SlotStore,
        runtime: RuntimeFactory,
        telemetry: Telemetry,
        models: Models,
        metrics: Metrics,
        installer: Installer,
        *,
        publish_event: Callable[[Event], Awaitable[None]],
        publish_reported: Callable[[], Awaitable[None]],
        drain: Callable[[], Awaitable[Any]],
        now: Callable[[], datetime],
        admission: Admission | None = None,
        idle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config, self.slots, self.runtime, self.telemetry = config, slots, runtime, telemetry
        self.models, self.metrics, self.installer = models, metrics, installer
        self._publish_event, self._publish_reported, self._drain = publish_event, publish_reported, drain
        self.now = now
        self.who = config.device_id
        # Held around loading a model and running its acceptance check (the installer takes one
        # per fetch attempt), never around another turn (a turn waiting for a turn deadlocks once
        # every turn does) and never across a hold: a device waiting for its window, deferral or
        # link must not keep another from installing.
        self.admission: Admission = admission if admission is not None else contextlib.nullcontext()
        # Called once a directive is carried out: the connections its fetches opened are closed.
        # Installs are minutes to months apart and servers drop idle connections long before
        # (nginx after 75 s), after which a kept one holds its socket and port in CLOSE_WAIT for
        # nothing; a simulated fleet of 10,000 ran out of local ports that way.
        self._idle = idle
        self.deployment = Deployment.restored(slots.state.deployment, slots.state.last_seq)
        self.last_rejection: Rejection | None = None  # the last refused/failed directive, reported
        # model sha256 -> the acceptance check's verdict and figures (for the models in the slots),
        # kept beside each slot's model so a restarted agent still reports them
        self.acceptance: dict[str, dict[str, Any]] = self._stored_verdicts()
        self._pending: Directive | None = None
        self._wake = asyncio.Event()
        # Windows, deferral and the link (device_agent.schedule).
        self.tz = schedule.zone(config.timezone)
        self.link_class = config.link_class  # the simulator (or a link monitor) may change it
        self.usage = LinkUsage(slots.data_dir / USAGE_FILE)
        self.waiting: Waiting | None = None  # reported: why the current directive waits
        self.busy_until: datetime | None = None  # an app's deferral (POST /v1/defer)
        self._ready_at: datetime | None = None  # when the staged model first could have gone in
        self._max_deferral_s = 0.0
        self._recheck = asyncio.Event()  # a deferral or the link changed: look again now
        self._bytes_fetched: int | None = None  # the install's bytes, for the next event
        self.probation_task: asyncio.Task[None] | None = None
        self._stall = stall_plan()

    # -- boot --------------------------------------------------------------------

    async def restore(self) -> None:
        """Serve what ``state.json`` says is active, after re-checking the file's hash.

        Falls back to the other slot when the active one is unusable, so a device
        with one good model on disk always serves it.
        """
        state = self.slots.state
        candidates = [state.active] if state.active else []
        # The other slot is a fallback, unless its model is staged: that one waits for its window,
        # and the retained directive stages it again.
        candidates += [
            s
            for s in state.slots
            if s not in candidates
            and state.slots[s] is not None
            and not (self.slots.slot_dir(s) / STAGED_FILE).exists()
        ]
        for slot in candidates:
            serving = await self.load_slot(slot) if slot else None
            if serving is None:
                continue
            self.models.swap(serving)
            record, resumes = state.probation, None
            if slot != state.active:
                self.slots.activate(slot)  # also drops a probation of the unusable slot
            elif record is not None and record.slot == slot:
                resumes = record.seq
                if record.previous:
                    self.models.previous = await self.load_slot(record.previous)
            self.deployment = self.deployment.booted(serving.sha256, resumes)
            return

    async def load_slot(self, slot: str) -> Serving | None:
        """Verify and load what ``slot`` holds; None if it is empty or unusable."""
        info = self.slots.state.slots.get(slot)
        path = self.slots.model_path(slot)
        if info is None or path is None:
            return None
        try:
            await asyncio.to_thread(verify_file, path, FileEntry(info.file, info.sha256, info.length))
            model = await self._load(path, info.sha256)
        except (CodedError, OSError) as exc:
            log.warning("%s: slot %s unusable: %s", self.who, slot, exc)
            return None
        return self._serving(model, info.sha256, info.name, info.version, slot)

    def _serving(self, model: LoadedModel, sha256: str, name: str, version: str, slot: str) -> Serving:
        """``model`` ready to serve, with the input check its slot's signed manifest describes."""
        info = self.slots.state.slots.get(slot)
        manifest = info.manifest if info is not None and info.sha256 == sha256 else None
        return Serving(
            model, sha256, name, version, slot, InputCheck.from_manifest(model.input_name, manifest)
        )

    async def _load(self, path: Path, sha256: str) -> LoadedModel:
        """Load and warm a model in a worker thread; a runtime's refusal is reported by its code."""
        try:
            return await asyncio.to_thread(self.runtime.load, path, sha256)
        except RuntimeLoadError as exc:
            raise InstallError(exc.code, str(exc)) from exc

    def resume_probation(self) -> None:
        """After a restart mid-probation: watch again (``probation.verdict`` blames a crash loop)."""
        record, s = self.slots.state.probation, self.models.serving
        if record is None or s is None or record.slot != s.slot:
            return
        record = record.rebooted()
        try:
            self.slots.set_probation(record)
        except OSError as exc:  # the restart is not counted on disk; the watch goes on
            self.metrics.count("state_write_failures")
            log.warning("%s: could not record the restart during probation: %s", self.who, exc)
        self.probation_task = asyncio.get_running_loop().create_task(self._watch_probation(record))

    # -- the queue ---------------------------------------------------------------

    def submit(self, directive: Directive) -> None:
        """Take ``directive`` up next (latest wins: an older queued directive is superseded)."""
        self._pending = directive
        self._wake.set()

    async def run(self) -> None:
        """Carry out directives as they come, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            directive, self._pending = self._pending, None
            if directive is None:
                continue
            if directive.not_before is not None and not await self._wait_not_before(directive):
                continue
            try:
                await self._carry_out_and_idle(directive)
            except asyncio.CancelledError:
                raise
            except _Superseded:
                continue
            except CodedError as exc:
                await self._fail(directive, exc.code, str(exc))
            except OSError as exc:
                if not is_disk_full(exc):
                    log.exception("%s: directive seq %d failed on I/O", self.who, directive.seq)
                    await self._fail(directive, ReasonCode.IO_ERROR, repr(exc))
                    continue
                # The filesystem filled up under us (the free-space check passed, then something
                # else wrote, or a quota hit): nothing was swapped; free what this install wrote.
                freed = self.slots.discard_unrecorded(self.slots.inactive)
                await self._fail(
                    directive, ReasonCode.DISK_FULL, f"{exc}; removed {freed} bytes of partial download"
                )
            except Exception as exc:
                log.exception("%s: directive seq %d failed unexpectedly", self.who, directive.seq)
                await self._fail(directive, ReasonCode.INTERNAL_ERROR, repr(exc))

    async def _wait_not_before(self, d: Directive) -> bool:
        """Hold a directive until its maintenance window opens; False if a newer one superseded it."""
        assert d.not_before is not None
        delay = (d.not_before - self.now()).total_seconds()
        if delay <= 0:
            return True
        detail = f"waiting until {d.not_before.isoformat()}"
        self.waiting = Waiting(d.seq, ReasonCode.NOT_BEFORE, detail, d.not_before)  # reported: not late
        await self._publish_event(
            Event(
                device_id=self.who,
                seq=d.seq,
                state=self.deployment.state,
                reason=ReasonCode.NOT_BEFORE,
                detail=detail,
                ts=self.now(),
            )
        )
        await self._publish_reported()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
                return self._pending is None  # woken by a newer directive: that one wins
            return True
        finally:
            self.waiting = None

    # -- windows, deferral, the link ------------------------------------------------

    def link(self) -> dict[str, Any]:
        """What ``Reported.link`` says: the link class, the device's daily budget, used today."""
        return {
            "class": self.link_class,
            "budget_bytes_per_day": self.config.link_budget_bytes_per_day or None,
            "used_bytes_today": self.usage.today(schedule.local_day(self.now(), self.tz)),
        }

    def set_link_class(self, link_class: str) -> None:
        """The link changed (a modem's metered flag, the simulator): a held download looks again."""
        if link_class not in schedule.LINK_CLASSES:
            raise ValueError(f"link class must be one of {', '.join(schedule.LINK_CLASSES)}")
        self.link_class = link_class
        self._recheck.set()

    async def defer(self, seconds: float, reason: str) -> dict[str, Any]:
        """An app is busy: hold activation ``seconds`` from now (0 withdraws the deferral).

        Granted up to the directive's ``max_deferral_seconds`` counted from when the staged model
        first could have gone in; the answer says until when activation is held as things stand.
        Reported as an Event (reason ``deferred``) so the fleet sees who held what.
        """
        now = self.now()
        self.busy_until = now + timedelta(seconds=seconds) if seconds > 0 else None
        limit = (
            self._ready_at + timedelta(seconds=self._max_deferral_s) if self._ready_at is not None else None
        )
        held = self.busy_until if limit is None or self.busy_until is None else min(self.busy_until, limit)
        what = f"{reason}: busy for {seconds:g}s" if seconds > 0 else f"{reason}: deferral withdrawn"
        await self._publish_event(
            Event(
                self.who,
                self.deployment.seq,
                self.deployment.state,
                reason=ReasonCode.DEFERRED,
                detail=what[:DETAIL_MAX],
                ts=now,
            )
        )
        self._recheck.set()
        return {
            "deferred_until": self.busy_until.isoformat() if self.busy_until else None,
            "holds_until": held.isoformat() if held else None,
            "max_deferral_seconds": self._max_deferral_s if self._ready_at is not None else None,
            "deployment_state": self.deployment.state.value,
        }

    async def _hold(self, d: Directive, check: Callable[[], schedule.Hold | None]) -> None:
        """Wait while ``check`` holds the directive (announcing each new reason: an Event, then the
        Reported snapshot's ``waiting``), re-reading the clock every ``schedule_poll_s`` or at once
        when a deferral or the link changes. Raises _Superseded when a newer directive arrives."""
        last: tuple[str, str] | None = None
        while True:
            hold = check()
            if hold is None:
                self.waiting = None
                return
            if (hold.reason, hold.detail) != last:
                last = (hold.reason, hold.detail)
                self.waiting = Waiting(d.seq, hold.reason, hold.detail, hold.until)
                log.info("%s: seq %d waits: %s", self.who, d.seq, hold.detail)
                await self._publish_event(
                    Event(
                        self.who,
                        d.seq,
                        self.deployment.state,
                        reason=hold.reason,
                        detail=hold.detail,
                        model_sha256=d.model.sha256 if d.model else None,
                        ts=self.now(),
                    )
                )
                await self._publish_reported()
            delay = self.config.schedule_poll_s
            if hold.until is not None:
                delay = min(delay, max(0.0, (hold.until - self.now()).total_seconds()))
            self._recheck.clear()
            waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._recheck.wait())]
            try:
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self._pending is not None:
                self.waiting = None
                raise _Superseded

    def _download_hold(self, d: Directive, ref: ModelRef) -> schedule.Hold | None:
        now = self.now()
        return schedule.download_hold(
            now,
            link_class=self.link_class,
            rule=d.metered,
            device_budget=self.config.link_budget_bytes_per_day,
            used_today=self.usage.today(schedule.local_day(now, self.tz)),
            length=ref.length,
            tz=self.tz,
        )

    def _activation_hold(self, d: Directive) -> schedule.Hold | None:
        assert d.activation is not None
        hold, self._ready_at = schedule.activation_hold(
            self.now(),
            windows=d.activation.windows,
            tz=self.tz,
            busy_until=self.busy_until,
            ready_at=self._ready_at,
            max_deferral_s=d.activation.max_deferral_seconds,
        )
        return hold

    async def _install(self, d: Directive, ref: ModelRef) -> tuple[str, Path]:
        """Download (when the link allows) and verify ``ref`` into a slot; count what it fetched."""
        if self.slots.find(ref.sha256) is None:
            await self._hold(d, lambda: self._download_hold(d, ref))
        self.installer.bytes_fetched = 0
        try:
            return await self.installer.install(ref, self._steps(d, ref))
        finally:
            fetched = self.installer.bytes_fetched
            self._bytes_fetched = fetched
            if fetched and self.link_class == "metered":
                self.usage.add(schedule.local_day(self.now(), self.tz), fetched)

    # -- carrying one out --------------------------------------------------------

    async def _carry_out_and_idle(self, d: Directive) -> None:
        try:
            await self._carry_out(d)
        finally:
            if self._idle is not None:
                try:
                    await self._idle()
                except Exception:  # a socket that would not close must not fail the directive
                    log.exception("%s: closing the fetcher's connections failed", self.who)

    async def _carry_out(self, d: Directive) -> None:
        self._ready_at, self._bytes_fetched = None, None
        self._max_deferral_s = d.activation.max_deferral_seconds if d.activation is not None else 0.0
        self.deployment = self.deployment.on(Trigger.BEGIN, d.seq)
        shadow = self.models.shadow
        if d.shadow is None or (shadow is not None and shadow.sha256 != d.shadow.sha256):
            self.stop_shadow()
        await self._apply_model(d)
        if d.shadow is not None:
            await self._apply_shadow(d, d.shadow)

    def _steps(self, d: Directive, ref: ModelRef) -> Move:
        async def move(trigger: Trigger, detail: str | None, /) -> None:
            await self._move(trigger, d.seq, sha=ref.sha256, detail=detail)

        return move

    async def _apply_model(self, d: Directive) -> None:
        ref, serving = d.model, self.models.serving
        if ref is None or (serving is not None and serving.sha256 == ref.sha256):
            if self.probation_task is not None and not self.probation_task.done():
                return  # the same model is still on probation: its watcher reports the outcome
            done = self.deployment.on(Trigger.KEEP if serving else Trigger.KEEP_NONE, d.seq)
            try:
                self.slots.record_outcome(done.outcome)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                # Nothing on the device changes: it already runs what the directive asks for (a
                # rollback to the served model, say). Only the record is lost; after a restart the
                # retained directive lands here again. Failing it would count a device that serves
                # the right model as a failure on a full disk.
                self.metrics.count("state_write_failures")
                log.warning("%s: seq %d done, outcome not persisted: %s", self.who, d.seq, exc)
            await self._enter(done, sha=serving.sha256 if serving else None)
            return
        await self._end_probation()  # a newer directive supersedes a probation in progress
        slot, path = await self._install(d, ref)
        if d.activation is not None and (hold := self._activation_hold(d)) is not None:
            # Downloaded and verified; the swap waits for the window (nothing is loaded meanwhile).
            marker = self.slots.slot_dir(slot) / STAGED_FILE
            atomic_write(marker, str(d.seq).encode())  # a reboot meanwhile must not serve it
            await self._enter(self.deployment.on(Trigger.STAGE, d.seq), sha=ref.sha256, detail=hold.detail)
            await self._hold(d, lambda: self._activation_hold(d))
            marker.unlink(missing_ok=True)
            info = self.slots.state.slots.get(slot)
            assert info is not None
            # Hours may have passed: the file is checked again before it is loaded.
            await asyncio.to_thread(verify_file, path, FileEntry(info.file, info.sha256, info.length))
        await self._move(Trigger.WARM, d.seq, sha=ref.sha256)
        async with self.admission:
            model = await self._load(path, ref.sha256)
        await self._accept(ref, slot, model)  # its fetch and its check take a turn each
        await self._move(Trigger.SWAP, d.seq, sha=ref.sha256)
        new = self._serving(model, ref.sha256, ref.name, ref.version, slot)
        previous = self.models.serving
        if d.probation is not None:
            record = ProbationRecord(
                seq=d.seq,
                slot=slot,
                previous=previous.slot if previous else None,
                sha256=ref.sha256,
                params=d.probation,
                min_inferences=max(d.probation.min_inferences, d.probation_inferences),
            )
            swapped = self.deployment.on(Trigger.SWAPPED_ON_PROBATION, d.seq, model=ref.sha256)
            # Persist first: if the disk is full this raises and nothing was swapped.
            self.slots.activate(slot, d.seq, probation=record, deployment=swapped.outcome)
            self.models.previous = previous
            base = self.telemetry.totals_of(ref.sha256)  # from the swap on, every answer counts
            self._swap(new)
            await self._enter(swapped, sha=ref.sha256)
            self.probation_task = asyncio.get_running_loop().create_task(self._watch_probation(record, base))
            return
        swapped = self.deployment.on(Trigger.SWAPPED, d.seq, model=ref.sha256)
        self.slots.activate(slot, d.seq, deployment=swapped.outcome)
        self.models.awaiting_proof = ref.sha256
        self._swap(new)  # after the activation is on disk
        await self._enter(swapped, sha=ref.sha256)

    async def _accept(self, ref: ModelRef, slot: str, model: LoadedModel) -> None:
        """The on-device acceptance check (:mod:`device_agent.acceptance`): the bundle's golden set
        on the loaded, warmed model, before the swap. Refuses with ``acceptance_failed`` and the
        figures; a bundle without a golden set passes unchecked (bundles compiled before it)."""
        info = self.slots.state.slots.get(slot)
        manifest = info.manifest if info is not None else {}
        try:
            spec = acceptance.Spec.from_manifest(manifest)
        except acceptance.MalformedAcceptance as exc:
            raise InstallError(ReasonCode.ACCEPTANCE_FAILED, str(exc)) from exc
        if spec is None:
            return
        entry = next(FileEntry(**f) for f in manifest["files"] if f["path"] == spec.file)
        data = await self.installer.small_file(ref, slot, entry)
        started = time.perf_counter()
        try:
            async with self.admission:  # not around the fetch above: that takes a turn of its own
                verdict = await asyncio.to_thread(check_golden, spec, data, model)
        except acceptance.MalformedAcceptance as exc:
            raise InstallError(ReasonCode.ACCEPTANCE_FAILED, str(exc)) from exc
        except Exception as exc:  # the runtime cannot even run the golden inputs: no swap either
            raise InstallError(
                ReasonCode.ACCEPTANCE_FAILED, f"the model fails on its golden set: {exc}"
            ) from exc
        seconds = time.perf_counter() - started
        record = verdict.to_dict() | {"seconds": round(seconds, 4), "hardware_id": self.config.hardware_id}
        self.acceptance = {k: v for k, v in self.acceptance.items() if k in self.slots.slot_hashes().values()}
        self.acceptance[ref.sha256] = record
        try:
            body = json.dumps(record | {"sha256": ref.sha256}).encode()
            atomic_write(self.slots.slot_dir(slot) / VERDICT_FILE, body)
        except OSError as exc:  # reported now; only a restart would forget it
            log.warning("%s: could not keep the acceptance verdict: %s", self.who, exc)
        log.info("%s: %s", self.who, verdict.detail, extra={"model_sha256": ref.sha256})
        if not verdict.passed:
            self.metrics.count("acceptance_refusals")
            raise InstallError(ReasonCode.ACCEPTANCE_FAILED, verdict.detail)

    def _stored_verdicts(self) -> dict[str, dict[str, Any]]:
        """The acceptance verdicts kept beside the slots' models (a slot's new model removes it)."""
        found: dict[str, dict[str, Any]] = {}
        for name, info in self.slots.state.slots.items():
            path = self.slots.slot_dir(name) / VERDICT_FILE
            if info is None or not path.is_file():
                continue
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                if isinstance(record, dict) and record.pop("sha256", None) == info.sha256:
                    found[info.sha256] = record
        return found

    def _swap(self, new: Serving) -> None:
        self.models.swap(new)
        self.metrics.count("swaps")
        log.info("%s: swapped in %s", self.who, new.sha256[:12], extra={"model_sha256": new.sha256})

    async def _apply_shadow(self, d: Directive, ref: ModelRef) -> None:
        serving, shadow = self.models.serving, self.models.shadow
        if serving is not None and serving.sha256 == ref.sha256:
            return  # the candidate is what we serve already: nothing to compare
        if shadow is not None and shadow.sha256 == ref.sha256:
            shadow.every = sample_every(d.shadow_sample_rate)
            return
        if self.probation_task is not None and not self.probation_task.done():
            # The inactive slot holds the revert target until the probation ends.
            await asyncio.shield(self.probation_task)
        slot, path = await self._install(d, ref)
        async with self.admission:
            model = await self._load(path, ref.sha256)
        self.stop_shadow()
        candidate = self._serving(model, ref.sha256, ref.name, ref.version, slot)
        self.models.shadow = Shadow(
            candidate, d.shadow_sample_rate, self.telemetry, name=f"{self.who}-shadow"
        )
        await self._move(Trigger.SHADOW, d.seq, sha=ref.sha256, detail=f"sample rate {d.shadow_sample_rate}")

    def stop_shadow(self, wait: bool = True) -> None:
        shadow, self.models.shadow = self.models.shadow, None
        if shadow is not None:
            shadow.stop(wait)

    # -- probation ---------------------------------------------------------------

    async def _end_probation(self) -> None:
        task, self.probation_task = self.probation_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.slots.state.probation is not None:
            self.slots.set_probation(None)
        self.models.previous = None

    async def _watch_probation(self, record: ProbationRecord, base: ModelTotals | None = None) -> None:
        """Judge the swapped-in model until it passes (report success) or must go (revert).

        ``base``: its totals at the swap (default: now, as after a restart), so answers it
        gave before the watch began still count."""
        previous = self.models.previous
        base = base if base is not None else self.telemetry.totals_of(record.sha256)
        old = self.telemetry.totals_of(previous.sha256) if previous else ModelTotals()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            now = self.telemetry.totals_of(record.sha256)
            verdict = probation.verdict(record, loop.time() - t0, base, now, old)
            if isinstance(verdict, Revert):
                await self._revert(record, verdict)
                return
            if isinstance(verdict, Pass):
                await self._pass(record, verdict)
                return
            await asyncio.sleep(PROBATION_POLL)

    async def _pass(self, record: ProbationRecord, verdict: Pass) -> None:
        """The model on probation stays: forget the previous one and report success."""
        self.models.previous = None
        self.probation_task = None
        passed = self.deployment.on(Trigger.PASS, record.seq)
        try:
            self.slots.record_outcome(passed.outcome, end_probation=True)
        except OSError as exc:  # a full disk: after a restart the probation resumes and passes again
            self.metrics.count("state_write_failures")
            log.warning("%s: probation of seq %d passed, not persisted: %s", self.who, record.seq, exc)
        await self._enter(passed, sha=record.sha256, detail=f"probation passed after {verdict.ok} ok")

    async def _revert(self, record: ProbationRecord, verdict: Revert) -> None:
        """Go back to the previous slot by ourselves (it was kept loaded), and say why."""
        seq, reason, detail = record.seq, verdict.reason, verdict.detail
        previous = self.models.previous
        if previous is None and record.previous:
            previous = await self.load_slot(record.previous)
        log.warning(
            "%s: probation of %s failed: %s (%s)",
            self.who,
            record.sha256[:12],
            reason,
            detail,
            extra={"device_id": self.who, "seq": seq, "reason": reason},
        )
        self.metrics.count("reverts")
        reverted = self.deployment.on(
            Trigger.REVERT, seq, error=reason, model=previous.sha256 if previous else None
        )
        try:
            if previous is not None:
                self.models.swap(previous)  # the swap back: first, a misbehaving model must go now
                self.slots.activate(previous.slot, seq, probation=None, deployment=reverted.outcome)
            else:
                # Nothing to go back to (first install): keep serving rather than serve nothing.
                self.slots.record_outcome(reverted.outcome, end_probation=True)
        except OSError as exc:
            # Disk full: reverted in memory; after a reboot the probation resumes and judges again.
            self.metrics.count("state_write_failures")
            log.warning("%s: could not record the revert of seq %d: %s", self.who, seq, exc)
        self.models.previous = None
        self.probation_task = None
        self.last_rejection = Rejection(seq=seq, reason=reason, detail=detail)
        await self._enter(reverted, sha=record.sha256, detail=detail, reason=reason)

    # -- outcomes ----------------------------------------------------------------

    async def _fail(self, d: Directive, code: str, detail: str) -> None:
        """Record the failure; the serving model is untouched (nothing was swapped)."""
        log.warning(
            "%s: directive seq %d failed: %s (%s)",
            self.who,
            d.seq,
            code,
            detail,
            extra={"device_id": self.who, "seq": d.seq, "reason": code},
        )
        self.metrics.count("failed_directives")
        self.metrics.count(f"failed_{code}")
        failed = self.deployment.on(Trigger.FAIL, d.seq, error=code)
        try:
            self.slots.record_outcome(failed.outcome)
        except OSError as exc:  # a full disk must not keep the failure from being reported
            self.metrics.count("state_write_failures")
            log.warning("%s: could not record the outcome of seq %d: %s", self.who, d.seq, exc)
        self.last_rejection = Rejection(seq=d.seq, reason=code, detail=detail[:DETAIL_MAX])
        sha = d.model.sha256 if d.model else None
        await self._enter(failed, sha=sha, detail=detail[:DETAIL_MAX], reason=code)

    async def _move(
        self,
        trigger: Trigger,
        seq: int,
        *,
        sha: str | None = None,
        detail: str | None = None,
    ) -> None:
        """One step of the state machine, announced."""
        await self._enter(self.deployment.on(trigger, seq), sha=sha, detail=detail)

    async def _enter(
        self,
        dep: Deployment,
        *,
        sha: str | None = None,
        detail: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Take ``dep`` (the table's answer) as the deployment and tell the fleet: Event, then Reported."""
        self.deployment = dep
        state = dep.state.value
        log.info(
            "%s: seq %d %s",
            self.who,
            dep.seq,
            state,
            extra={"device_id": self.who, "seq": dep.seq, "state": state, "model_sha256": sha},
        )
        fetched, self._bytes_fetched = self._bytes_fetched, None  # on the first event after the install
        event = Event(
            self.who,
            dep.seq,
            dep.state,
            reason=reason,
            detail=detail,
            model_sha256=sha,
            ts=self.now(),
            bytes_fetched=fetched,
        )
        await self._publish_event(event)
        await self._publish_reported()
        stall = self._stall.get(state)
        if stall:
            log.warning("%s: stalling %.1fs in %s (%s)", self.who, stall, state, STALL_ENV)
            await self._drain()
            await asyncio.sleep(stall)


def check_golden(spec: acceptance.Spec, data: bytes, model: LoadedModel) -> acceptance.Verdict:
    """Run the golden set on ``model`` and judge it (blocking: the model runs once per sample)."""
    golden = acceptance.Golden.parse(data, spec)
    outs = acceptance.run_golden(model.run, golden, list(spec.outputs))
    return acceptance.judge(spec, acceptance.measure(spec, golden.refs, outs))


__all__ = ["DETAIL_MAX", "PROBATION_POLL", "STALL_ENV", "LinkUsage", "Reconciler", "stall_plan"]

"""One-command deploy: a float model to every hardware class of a selected fleet.

``edgefleet deploy model.onnx --selector app=ocr --policy canary.yaml`` finds the hardware
classes among the selected devices, picks each class's compiler target, compiles and gates a
bundle per class (in parallel, one process per compile), then signs, pushes and starts one
rollout per class. The decisions are pure functions here (which target, what a failed class
means for the rest); the CLI (``edgefleet.commands.deploy``) does the I/O and the display.

Which target a class gets, first match wins:

1. the applied ``Model`` document of the same name: ``spec.targets.<class>.target``;
2. the applied ``HardwareTargets`` document (``default`` unless named);
3. the compiler's built-in default: the registered target for the model's format whose
   default hardware ids hold the class (``compiler.targets``), so a new target family
   brings its classes with it.

A class whose compile or gate fails stops the deploy before anything is pushed
(``on_class_failure: abort``, the default), or is left out and named (``skip``).

Each compile runs in a worker process: the compiler redirects file descriptor 2 while it runs
(``compiler.toolchain_notes``), which belongs to the process, so two compiles on threads
would tangle each other's stderr.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the compile workers import this module: keep it free of the server's imports
    from fleet_server.declarative import ModelSpec
    from fleet_server.policy import ClassFailure


class TargetSource(StrEnum):
    """Where a class's target came from (shown, so a surprising target can be traced)."""

    MODEL = "model"
    HARDWARE_TARGETS = "hardware-targets"
    BUILT_IN = "built-in"
    NONE = "none"


class ClassState(StrEnum):
    PLANNED = "planned"
    COMPILED = "compiled"
    FAILED = "failed"  # compile or gate failed, or no target (a refusal under abort)
    SKIPPED = "skipped"  # failed, and the policy says skip
    NOT_STARTED = "not_started"  # another class failed under abort: nothing of this one was pushed
    PUSHED = "pushed"
    ROLLING_OUT = "rolling_out"
    REFUSED = "refused"  # the server refused the push or the rollout


@dataclass
class ClassPlan:
    """One hardware class of the deploy and what became of it."""

    hardware_class: str
    devices: int
    target: str | None
    target_from: TargetSource
    gate: dict[str, float] = field(default_factory=dict)
    state: ClassState = ClassState.PLANNED
    code: str = ""  # why it failed: no_target, compile_failed, gate_failed, push_refused, rollout_refused
    reason: str = ""
    bundle: str | None = None
    model: str | None = None  # name:version pushed
    rollout: str | None = None
    compile_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(self).items()}

    def refusal(self) -> str:
        return f"{self.hardware_class}: {self.code}: {self.reason}"


def built_in_target(hardware_class: str, model_format: str) -> str | None:
    """The registered target for ``model_format`` whose default hardware ids hold the class."""
    from compiler.targets import get_target, known_targets

    for name in known_targets():
        t = get_target(name)
        if t.accepts == model_format and hardware_class in t.default_hardware_ids:
            return name
    return None


def plan_classes(
    devices_per_class: Mapping[str, int],
    model_format: str,
    *,
    model: ModelSpec | None = None,
    hardware_targets: Mapping[str, str] | None = None,
    default: Callable[[str, str], str | None] = built_in_target,
) -> list[ClassPlan]:
    """Each class's target and gate thresholds (the model's, then the class's over them)."""
    plans = []
    for hw in sorted(devices_per_class):
        per_class = model.targets.get(hw) if model is not None else None
        gate = model.gate.overrides() if model is not None else {}
        if per_class is not None:
            gate |= per_class.gate.overrides()
        target: str | None
        if per_class is not None and per_class.target is not None:
            target, source = per_class.target, TargetSource.MODEL
        elif hardware_targets is not None and hw in hardware_targets:
            target, source = hardware_targets[hw], TargetSource.HARDWARE_TARGETS
        else:
            target = default(hw, model_format)
            source = TargetSource.BUILT_IN if target is not None else TargetSource.NONE
        plan = ClassPlan(hw, devices_per_class[hw], target, source, gate)
        if target is None:
            plan.state, plan.code = ClassState.FAILED, "no_target"
            plan.reason = (
                f"no compiler target for hardware class {hw!r} and a {model_format.upper()} model: map it in"
                " a HardwareTargets document or the Model's spec.targets"
            )
        plans.append(plan)
    return plans


def settle_failures(plans: Sequence[ClassPlan], on_failure: ClassFailure) -> list[ClassPlan]:
    """After the compiles: the classes to push, given what failed and the policy.

    Under ``abort`` one failed class means none is pushed (the others become ``not_started``);
    under ``skip`` the failed ones are left out. Pure: it only moves states."""
    failed = [p for p in plans if p.state is ClassState.FAILED]
    if failed and on_failure == "abort":
        for p in plans:
            if p.state is ClassState.COMPILED:
                p.state = ClassState.NOT_STARTED
        return []
    for p in failed:
        p.state = ClassState.SKIPPED
    return [p for p in plans if p.state is ClassState.COMPILED]


def class_version(version: str, hardware_class: str) -> str:
    """The version each class's bundle is pushed as: a server holds one bundle per name:version."""
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in hardware_class)
    return f"{version}-{safe}"


def worker_count(jobs: int, requested: int | None = None) -> int:
    """Compiles at once: as asked, else one per usable CPU, never more than there are classes."""
    if requested is not None:
        return max(1, min(requested, jobs))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, jobs))


@dataclass(frozen=True)
class CompileJob:
    """Everything a worker process needs to compile one class (picklable)."""

    hardware_class: str
    model_path: str
    target: str
    calib: str
    eval: str | None
    out_dir: str
    key_pem: bytes  # the release key, unencrypted, handed to our own child process only
    name: str
    version: str
    release: int
    gate: dict[str, float]
    mixed_precision_seconds: float
    output_kinds: str | None = None  # name=kind[:param=v],... as compile --output-kind


_events: Any = None  # the worker's progress queue (set by ``_init_worker``)


def _init_worker(events: Any) -> None:
    global _events
    _events = events


def compile_class(job: CompileJob) -> dict[str, Any]:
    """Compile one class in a worker process: ``{"ok": True, "bundle", "ref"}`` or the failure."""
    import time

    from compiler import CompilerError, Gate, GateFailed
    from compiler.pipeline import compile_model
    from signing.keys import KeyPair

    started = time.perf_counter()

    def progress(step: str, fraction: float) -> None:
        if _events is not None:
            _events.put((job.hardware_class, step, fraction))

    try:
        result = compile_model(
            Path(job.model_path),
            target=job.target,
            calib_path=job.calib,
            eval_path=job.eval,
            out_dir=Path(job.out_dir),
            release_key=KeyPair.from_pem(job.key_pem, name="release"),
            name=job.name,
            version=job.version,
            release=job.release,
            hardware_ids=[job.hardware_class],
            gate=Gate(**job.gate),  # type: ignore[arg-type]
            progress=progress,
            overwrite=True,
            latency_repeats=0,  # host latency is not a gate; the devices' own probation judges latency
            mixed_precision_seconds=job.mixed_precision_seconds,
            output_kinds=job.output_kinds,
        )
    except GateFailed as exc:
        return {"ok": False, "code": "gate_failed", "reason": "; ".join(exc.failures)}
    except (CompilerError, OSError, ValueError) as exc:
        return {"ok": False, "code": "compile_failed", "reason": " ".join(str(exc).split())}
    except Exception as exc:  # a toolchain crash fails this class, never the whole deploy
        return {"ok": False, "code": "compile_failed", "reason": f"{type(exc).__name__}: {exc}"}
    return {
        "ok": True,
        "bundle": str(result.bundle_dir),
        "ref": result.manifest.ref,
        "seconds": time.perf_counter() - started,
    }


def compile_all(
    jobs: Sequence[CompileJob],
    workers: int,
    on_event: Callable[[str, str, float], None],
    on_done: Callable[[str, dict[str, Any]], None],
) -> None:
    """Run ``jobs`` on ``workers`` processes; report progress and each result as it comes."""
    import multiprocessing

    # Workers fork from a fresh server process that imported the compiler once (never from this
    # process, which holds threads and sockets); it stays for the next deploy in this process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["edgefleet.deploy", "compiler.pipeline"])
    events = context.Queue()
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(events,)
    ) as pool:
        futures: dict[Future[dict[str, Any]], str] = {
            pool.submit(compile_class, job): job.hardware_class for job in jobs
        }
        pending = set(futures)
        while pending:
            try:
                hw, step, fraction = events.get(timeout=0.1)
                on_event(hw, step, fraction)
            except queue.Empty:
                pass
            for f in [f for f in pending if f.done()]:
                pending.discard(f)
                try:
                    result = f.result()
                except Exception as exc:  # the worker process died
                    result = {"ok": False, "code": "compile_failed", "reason": f"worker died: {exc}"}
                on_done(futures[f], result)
    events.close()


__all__ = [
    "ClassPlan",
    "ClassState",
    "CompileJob",
    "TargetSource",
    "built_in_target",
    "class_version",
    "compile_all",
    "compile_class",
    "plan_classes",
    "settle_failures",
    "worker_count",
]

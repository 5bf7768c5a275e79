"""Deltas from the model files devices run to a new one, stored as plain files in the TUF targets tree.

A delta is a zstd frame made with the old file as a raw-content dictionary
(``zstd --patch-from``; docs/decisions/0024-delta-updates.md). It is written to
``<repository>/targets/`` + :func:`device_agent.protocol.delta_path` (base
sha256, new sha256): a name the device derives by itself, so the directory can
be copied to any static mirror and no metadata has to list it. It needs no
signature: the device checks what it rebuilds against the signed hash and
length of the full file (``device_agent.delta``).

Which bases: when a release is stored, the previous releases of the same family
and target (what a fleet runs before it moves up); when a rollout is created,
whatever the devices it targets report running, built before the rollout exists
so its first devices find them. A delta no smaller than
``MAX_DELTA_FRACTION`` of the new file is not kept (devices would refuse it).
Building one costs CPU (level 19: 2.4 CPU-s for a head-only change of a 10 MB
model, 8 s when every layer moved, ~190 MB peak; docs/benchmarks.md), paid once per (base, new)
pair: an existing delta is reused. It runs in the request that stores the
release or creates the rollout.
A failure to build one never fails the release or the rollout; devices then
take the full file. With static delivery on, the mirror is published after the
deltas are built (the upload's publish comes after the release's deltas; a
rollout publishes again when it built one), so devices that install from
mirrors find them there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from device_agent.protocol import delta_path, delta_window_log, max_delta_bytes
from fleet_server.models import Device, Model, RolloutDevice
from fleet_server.selector import matching_devices

log = logging.getLogger(__name__)

# Lower levels lose the matches far back in a large base: a head-only change of a 10 MB model gave
# a patch of 81% of the file at level 3, 42% at 9, 0.01% at 19 (small models: the same at any level).
LEVEL = 19
RELEASE_BASES = 3  # the previous releases of a family a new release gets deltas from


@dataclass(frozen=True)
class Built:
    """One delta the server holds (or decided not to keep)."""

    base_sha256: str
    new_sha256: str
    size: int
    kept: bool  # False: no smaller than MAX_DELTA_FRACTION of the new file


def make_delta(base: Path, new: Path, dest: Path, *, level: int = LEVEL) -> int:
    """Write the zstd patch that rebuilds ``new`` from ``base`` to ``dest`` (atomically); return its size."""
    import zstandard

    length = new.stat().st_size
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        window_log=delta_window_log(length),
        enable_ldm=True,
        source_size=length,
        write_checksum=1,  # a corrupt delta is named as such on the device, before the hash
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(new, "rb") as src, open(tmp, "wb") as out:
        cctx = zstandard.ZstdCompressor(
            dict_data=zstandard.ZstdCompressionDict(
                base.read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT
            ),
            compression_params=params,
        )
        cctx.copy_stream(src, out, size=length)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
    return dest.stat().st_size


def model_file(model: Model) -> Path:
    return Path(model.storage_path) / str(model.manifest["files"][0]["path"])


def build(targets_dir: Path, new: Model, bases: Iterable[Model], *, level: int = LEVEL) -> list[Built]:
    """Deltas from each of ``bases`` to ``new`` under ``targets_dir`` (existing ones are kept as they are)."""
    done: list[Built] = []
    seen: set[str] = set()
    for base in bases:
        if base.sha256 == new.sha256 or base.sha256 in seen:
            continue
        seen.add(base.sha256)
        dest = targets_dir / delta_path(base.sha256, new.sha256)
        if dest.is_file():
            done.append(Built(base.sha256, new.sha256, dest.stat().st_size, True))
            continue
        size = make_delta(model_file(base), model_file(new), dest, level=level)
        kept = size <= max_delta_bytes(new.length)
        if not kept:
            dest.unlink(missing_ok=True)
        log.info(
            "delta %s -> %s: %d bytes of %d (%s)",
            base.sha256[:12],
            new.sha256[:12],
            size,
            new.length,
            "kept" if kept else "not kept: too large",
        )
        done.append(Built(base.sha256, new.sha256, size, kept))
    return done


def release_bases(session: Session, model: Model, limit: int = RELEASE_BASES) -> list[Model]:
    """The latest earlier releases of ``model``'s family for the same target."""
    rows = session.exec(
        select(Model)
        .where(Model.name == model.name, Model.target == model.target, Model.sha256 != model.sha256)
        .order_by(col(Model.created_at).desc())
        .limit(limit)
    ).all()
    return list(rows)


def running_bases(session: Session, model: Model, rollout_id: str) -> list[Model]:
    """The stored models (same target as ``model``) the rollout's devices report running."""
    running = set(
        session.exec(
            select(Device.running_sha256)
            .join(RolloutDevice, col(RolloutDevice.device_id) == col(Device.id))
            .where(RolloutDevice.rollout_id == rollout_id)
            .distinct()
        ).all()
    )
    return _stored(session, model, running)


def selected_bases(session: Session, model: Model, selector: dict[str, Any]) -> list[Model]:
    """The stored models (same target as ``model``) run by the devices a rollout of ``model`` with
    ``selector`` would target: known before the rollout exists, so its deltas can be built (and
    published) before any of its devices is told to install."""
    return _stored(
        session, model, (t.running_sha256 for t in matching_devices(session, selector, model.hardware_ids))
    )


def _stored(session: Session, model: Model, running: Iterable[str | None]) -> list[Model]:
    wanted = set(running) - {None, model.sha256}
    if not wanted:
        return []
    rows = session.exec(
        select(Model).where(col(Model.sha256).in_(wanted), Model.target == model.target)
    ).all()
    return list(rows)


def build_quietly(targets_dir: Path | None, new: Model, bases: Callable[[], list[Model]]) -> list[Built]:
    """:func:`build` from the models ``bases()`` picks, logging instead of raising: no delta is ever
    worth failing a release or a rollout."""
    if targets_dir is None:
        return []
    try:
        return build(targets_dir, new, bases())
    except Exception:
        log.exception("building deltas to %s:%s failed; devices take the full file", new.name, new.version)
        return []


__all__ = [
    "Built",
    "build",
    "build_quietly",
    "make_delta",
    "model_file",
    "release_bases",
    "running_bases",
    "selected_bases",
]

"""Which deltas the server builds, and where: from the previous releases of a family and from what the
devices of a rollout run, into the targets tree under the name a device derives by itself."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sqlmodel import Session, SQLModel, create_engine

from device_agent.protocol import delta_path, max_delta_bytes
from fleet_server import deltas
from fleet_server.models import Device, Model, Rollout, RolloutDevice


def _model(root: Path, session: Session, version: int, data: bytes, target: str = "arm64-cpu") -> Model:
    d = root / f"m{version}-{target}"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(data)
    m = Model(
        name="fam",
        version=str(version),
        release=version,
        target=target,
        hardware_ids=["rpi4"],
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
        manifest={"files": [{"path": "model.onnx"}]},
        storage_path=str(d),
    )
    session.add(m)
    session.commit()
    return m


def _head_changed(data: bytes, seed: int) -> bytes:
    return data[:-2048] + os.urandom(1024) + bytes([seed]) * 1024


def test_release_and_rollout_bases_build_deltas_devices_find_by_name(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    SQLModel.metadata.create_all(engine)
    targets = tmp_path / "tuf" / "targets"
    body = os.urandom(200_000)
    with Session(engine) as session:
        versions = [_model(tmp_path, session, 1, body)]
        for v in range(2, 7):
            versions.append(_model(tmp_path, session, v, _head_changed(body, v)))
        other_target = _model(tmp_path, session, 9, _head_changed(body, 9), target="tflite-int8")
        new = versions[-1]
        # a release gets deltas from the previous releases of its family and target, newest first
        bases = deltas.release_bases(session, new)
        assert [b.version for b in bases] == ["5", "4", "3"]
        built = deltas.build(targets, new, bases)
        assert all(b.kept for b in built)
        for b in bases:
            patch = targets / delta_path(b.sha256, new.sha256)
            assert patch.is_file() and patch.stat().st_size < 0.05 * new.length
        # a rollout also gets them from what its devices run (v1 is not among the last releases)
        running_on = {"d1": versions[0], "d2": other_target, "d3": new, "d4": versions[1]}
        for dev, m in running_on.items():
            session.add(Device(id=dev, hardware_id="rpi4", running_sha256=m.sha256))
        session.add(Device(id="d5", hardware_id="rpi4"))  # reports nothing yet
        session.commit()
        assert new.id is not None
        rollout = Rollout(
            id="r1",
            model_id=new.id,
            model_ref="fam:6",
            model_sha256=new.sha256,
            soak_seconds=1.0,
            device_timeout_seconds=60.0,
            max_error_rate=0.1,
            min_inferences=1,
            max_failure_rate=0.1,
        )
        session.add(rollout)
        session.flush()
        for dev in ("d1", "d2", "d3", "d5"):  # d4 (running v2) is not in this rollout
            session.add(RolloutDevice(rollout_id="r1", device_id=dev, order_key=dev))
        session.commit()
        running = deltas.running_bases(session, new, "r1")
        assert [m.version for m in running] == ["1"]  # another target's file and the new one: no delta
        deltas.build(targets, new, running)
        assert (targets / delta_path(versions[0].sha256, new.sha256)).is_file()
        # an unrelated file: the delta would be no smaller than MAX_DELTA_FRACTION, so it is not kept
        stranger = _model(tmp_path, session, 7, os.urandom(200_000))
        (kept,) = deltas.build(targets, stranger, [new])
        assert not kept.kept and kept.size > max_delta_bytes(stranger.length)
        assert not (targets / delta_path(new.sha256, stranger.sha256)).exists()
        # nothing to build from, or no repository: nothing happens, nothing raises
        assert deltas.build_quietly(None, new, lambda: bases) == []
        assert deltas.build_quietly(targets, new, lambda: []) == []

        def broken() -> list[Model]:
            raise RuntimeError("the database went away")

        assert deltas.build_quietly(targets, new, broken) == []

"""Alembic is the schema: upgrade head at startup on SQLite and PostgreSQL, from empty or from a
database whose tables were created without migrations (no ``alembic_version``)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlmodel import Session, SQLModel, select

from fleet_server import policy
from fleet_server.migrate import alembic_config, current_revision
from fleet_server.models import Rollout, RolloutDecision
from fleet_server.settings import ServerSettings
from fleet_server.store import make_engine

HEAD = "0023"


def _assert_models_match(url: str) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    engine.dispose()


def test_sqlite_fresh_database_is_migrated_to_head(tmp_path: Path) -> None:
    engine = make_engine(ServerSettings(data_dir=tmp_path))
    assert current_revision(engine) == HEAD
    engine.dispose()
    _assert_models_match(ServerSettings(data_dir=tmp_path).resolved_database_url())
    again = make_engine(ServerSettings(data_dir=tmp_path))  # idempotent
    assert current_revision(again) == HEAD


def test_database_created_without_migrations_is_stamped_and_upgraded_keeping_its_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "0001")
    raw = create_engine(url)
    with raw.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))  # tables made by create_all, no migration history
        conn.execute(
            text(
                "INSERT INTO model (id, name, version, release, target, hardware_ids, sha256, length,"
                " manifest, storage_path, created_at)"
                " VALUES (1, 'm', '1', 1, 'arm64-cpu', '[]', 'x', 1, '{}', '/x', '2026-01-01 00:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO rollout (id, model_id, model_ref, model_sha256, selector, stages, soak_seconds,"
                " device_timeout_seconds, max_error_rate, min_inferences, max_failure_rate, state,"
                " current_stage, created_at, updated_at) VALUES ('old', 1, 'm:1', 'x', '{}', '[100]', 0, 60,"
                " 0.05, 20, 0, 'completed', 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
    raw.dispose()
    engine = make_engine(ServerSettings(database_url=url, data_dir=tmp_path))
    assert current_revision(engine) == HEAD
    with engine.connect() as conn:
        row = conn.execute(text("SELECT stage_unit, policy, approved_through FROM rollout")).one()
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # enforced again afterwards
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
    assert (row[0], row[1], row[2]) == ("percent", "{}", -1)
    _assert_models_match(url)


def test_stored_policies_are_read_in_the_policy_model_shape_after_upgrade(tmp_path: Path) -> None:
    """Rollouts stored with the flat probation keys (and retry limits for classes no agent reports)
    load as the engine's policy; what the upgrade removed is recorded on the rollout."""
    url = f"sqlite:///{tmp_path / 'flat.db'}"
    command.upgrade(alembic_config(url), "0004")
    flat = {
        "require_approval": True,
        "retry_limits": {"timed_out": 1, "download_faild": 3},
        "probation_seconds": 30.0,
        "probation_min_inferences": 7,
        "probation_max_error_rate": 0.1,
        "probation_max_latency_ratio": 2.0,
    }
    without = {"probation_seconds": None, "probation_min_inferences": 1}
    raw = create_engine(url)
    with raw.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model (id, name, version, release, target, hardware_ids, sha256, length,"
                " manifest, storage_path, created_at)"
                " VALUES (1, 'm', '1', 1, 'arm64-cpu', '[]', 'x', 1, '{}', '/x', '2026-01-01 00:00:00')"
            )
        )
        for rid, stored in (("flat", flat), ("none", without), ("empty", {})):
            conn.execute(
                text(
                    "INSERT INTO rollout (id, model_id, model_ref, model_sha256, selector, stages,"
                    " soak_seconds, device_timeout_seconds, max_error_rate, min_inferences,"
                    " max_failure_rate, state, current_stage, stage_unit, policy, approved_through,"
                    " rollback_requested, created_at, updated_at) VALUES (:id, 1, 'm:1', 'x', '{}',"
                    " '[100]', 5, 60, 0.05, 20, 0, 'running', 0, 'percent', :policy, -1, 0,"
                    " '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
                ),
                {"id": rid, "policy": json.dumps(stored)},
            )
    raw.dispose()
    engine = make_engine(ServerSettings(database_url=url, data_dir=tmp_path))
    with Session(engine) as session:
        loaded = {r.id: policy.from_row(r) for r in session.exec(select(Rollout)).all()}
        [note] = session.exec(select(RolloutDecision)).all()
    p = loaded["flat"]
    assert p.probation is not None
    assert (p.probation.seconds, p.probation.min_inferences, p.probation.max_error_rate) == (30, 7, 0.1)
    assert p.probation.max_latency_ratio == 2 and p.require_approval and p.soak_seconds == 5
    assert p.retry_limits == {"timed_out": 1}
    assert (note.rollout_id, note.action) == ("flat", "policy_migrated") and "download_faild" in note.reason
    assert note.figures == {"removed_retry_limits": {"download_faild": 3}}
    assert loaded["none"].probation is None and loaded["empty"] == loaded["none"]  # the defaults
    command.downgrade(alembic_config(url), "0004")
    with raw.connect() as conn:
        back = json.loads(conn.execute(text("SELECT policy FROM rollout WHERE id = 'flat'")).scalar_one())
    assert {k: back[k] for k in flat if k.startswith("probation_")} == {
        k: v for k, v in flat.items() if k.startswith("probation_")
    }
    engine.dispose()


def test_postgres_replicas_starting_together_migrate_once(fresh_pg: str, tmp_path: Path) -> None:
    results: list[str | None] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            engine = make_engine(ServerSettings(database_url=fresh_pg, data_dir=tmp_path))
            results.append(current_revision(engine))
            engine.dispose()
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [HEAD] * 3
    _assert_models_match(fresh_pg)
    engine = create_engine(fresh_pg)
    assert "rolloutdevice" in inspect(engine).get_table_names()
    engine.dispose()


def test_labels_that_met_their_capture_before_the_counts_existed_are_counted_on_upgrade(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0010")
    raw = create_engine(url)
    with raw.begin() as conn:
        for iid, predicted in (("i1", "3"), ("i2", "1"), ("i3", None)):
            conn.execute(
                text(
                    "INSERT INTO captureitem (inference_id, device_id, batch_id, position, model_sha256,"
                    " hardware_id, ts, predicted) VALUES (:i, 'd', 'b', 0, 'sha', 'rpi4', '2026-01-01', :p)"
                ),
                {"i": iid, "p": predicted},
            )
        for iid, source, label in (
            ("i1", "app", "3"),
            ("i1", "qa", '"3"'),
            ("i2", "app", "[3]"),
            ("i3", "app", "1"),
        ):
            conn.execute(
                text(
                    "INSERT INTO label (inference_id, source, label, label_time, received_at)"
                    " VALUES (:i, :s, :l, '2026-01-01', '2026-01-01')"
                ),
                {"i": iid, "s": source, "l": label},
            )
    raw.dispose()
    engine = make_engine(ServerSettings(database_url=url, data_dir=tmp_path))
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT model_sha256, hardware_id, labels, labels_correct FROM serverlabelcount")
        )
        assert rows.all() == [("sha", "rpi4", 3, 2)]  # i3: no prediction captured
    engine.dispose()


def test_the_last_days_batches_are_summed_per_minute_on_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0011")
    now = datetime.now(UTC)
    sha = "a" * 64
    old = SQLModel.metadata.tables
    with create_engine(url).begin() as conn:
        conn.execute(
            old["device"].insert(),
            [
                {"id": d, "hardware_id": hw, "registered_at": now}
                for d, hw in (("d1", "rpi4"), ("d2", "jetson"))
            ],
        )
        stats = {
            "inferences": 10,
            "errors": {"x": 1},
            "latency_buckets": [1, 2],
            "labels": 2,
            "labels_correct": 5,
        }
        conn.execute(
            old["telemetrybatchrow"].insert(),
            [
                {"device_id": d, "batch_id": b, "window_start": now, "window_end": now, "received_at": t,
                 "models": {sha: stats}}
                for d, b, t in (("d1", "b1", now), ("d1", "b2", now), ("d2", "b3", now),
                                ("d1", "b4", now - timedelta(days=2)))  # older than the longest window
            ],
        )  # fmt: skip
    engine = make_engine(ServerSettings(database_url=url, data_dir=tmp_path))
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT hardware_id, minute, inferences, errors, labels, labels_correct, latency_buckets"
                " FROM telemetryminute ORDER BY hardware_id"
            )
        ).all()
    minute = int(now.timestamp()) // 60 * 60
    assert [tuple(r) for r in rows] == [
        ("jetson", minute, 10, 1, 2, 2, "[1, 2]"),
        ("rpi4", minute, 20, 2, 4, 4, "[2, 4]"),  # at most as many right labels as labels
    ]
    engine.dispose()


def test_aggregates_stored_before_input_buckets_start_with_none_and_downgrade_drops_them(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0012")
    raw = create_engine(url)
    with raw.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO modelaggregate (device_id, sha256, served_ok, inferences, errors,"
                " latency_buckets, output_hist, class_hist, shadow_samples, shadow_agree, updated_at)"
                " VALUES ('d', 'sha', 0, 5, 0, '[]', '[]', '{}', 0, 0, '2026-01-01')"
            )
        )
    command.upgrade(alembic_config(url), "0013")
    with raw.connect() as conn:
        assert conn.execute(text("SELECT inferences, input_buckets FROM modelaggregate")).all() == [(5, "{}")]
    command.downgrade(alembic_config(url), "0012")
    assert "input_buckets" not in {c["name"] for c in inspect(raw).get_columns("modelaggregate")}
    raw.dispose()

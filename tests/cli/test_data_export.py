"""`edgefleet data export` without a server: how rows become columns, and the usage errors found before
the server is asked (the export against a real server and agent: tests/agent/test_capture_fleet_server.py)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.commands.data import columns, parse_since


def _tensor(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def _row(i: int, label: Any = None, shape: tuple[int, ...] = (1, 4), **over: Any) -> dict[str, Any]:
    row = {
        "inference_id": f"id-{i}",
        "device_id": "d",
        "model": "digits:2",
        "sha256": "a" * 64,
        "hardware_id": "rpi4",
        "rollout_id": None,
        "stage": None,
        "ts": "2026-12-01T10:00:00.123000Z",
        "predicted": "1",
        "labels": []
        if label is None
        else [{"label": label, "source": "qa", "label_time": "2026-12-01T11:00:00Z"}],
        "inputs": {"x": _tensor(np.full(shape, i, np.float32))},
        "outputs": [_tensor(np.arange(3, dtype=np.float32))],
    }
    row.update(over)
    return row


def test_rows_become_typed_columns_without_pickles(tmp_path: Path) -> None:
    cols = columns([_row(0, 3), _row(1), _row(2, 5, stage=1, rollout_id="r1")])
    assert cols["label"].dtype == np.int64 and cols["label"].tolist() == [3, -1, 5]
    assert cols["label_present"].tolist() == [True, False, True]
    assert cols["stage"].tolist() == [-1, -1, 1] and cols["rollout_id"].tolist() == ["", "", "r1"]
    assert cols["input_x"].shape == (3, 1, 4) and cols["input_x"][2, 0, 0] == 2
    assert cols["output_0"].shape == (3, 3)
    assert cols["ts"][0] == np.datetime64("2026-12-01T10:00:00.123", "ms")
    assert np.isnat(cols["label_time"][1]) and cols["label_time"][0] == np.datetime64(
        "2026-12-01T11:00:00", "ms"
    )
    np.savez(tmp_path / "ds.npz", **cols)
    with np.load(tmp_path / "ds.npz", allow_pickle=False) as data:
        assert sorted(data.files) == sorted(cols)


def test_mixed_labels_and_ragged_arrays() -> None:
    cols = columns([_row(0, 0.5), _row(1, 2)])
    assert cols["label"].dtype == np.float64 and cols["label"].tolist() == [0.5, 2.0]
    assert columns([_row(0, "cat"), _row(1, 2)])["label"].tolist() == ["cat", "2"]
    ragged = columns([_row(0, 1), _row(1, 1, shape=(1, 5))])
    assert "input_x" not in ragged and "output_0" in ragged  # left out, with a warning
    partial = columns([_row(0, 1), _row(1, 1, inputs=None)])
    assert "input_x" not in partial


def test_since_takes_durations_and_times() -> None:
    now = datetime(2026, 12, 8, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("12h", now) == now - timedelta(hours=12)
    assert parse_since("2026-12-01T00:00:00Z") == datetime(2026, 12, 1, tzinfo=UTC)


def test_a_bad_since_is_a_usage_error_before_any_request() -> None:
    runner = CliRunner()
    for since in ("yesterday", "2026-12-01T00:00:00", "7x"):
        r = runner.invoke(
            app,
            [
                "data",
                "export",
                "--model",
                "digits",
                "--since",
                since,
                "--out",
                "x.npz",
                "--server",
                "http://127.0.0.1:9",
            ],
        )
        assert r.exit_code == 2, (since, r.output)
        assert "--since" in r.output and len(r.output.strip().splitlines()) == 1

"""`edgefleet data export`: captured inferences joined with their labels, as one ``.npz`` for retraining.

The server pages through ``GET /api/v1/captures`` (model, window, labelled only); this
command stacks the pages into arrays, one column per field, so ``numpy.load`` gives a
dataset without pickles:

- ``input_<name>`` / ``output_<i>``: the arrays (N, ...) when every row holds them with one
  shape (a column that does not is left out, with a warning);
- ``label`` (int64, float64 or str), ``label_present`` (bool), ``label_source``,
  ``label_time`` (datetime64[ms], NaT without a label): the first label by source;
- ``inference_id``, ``device_id``, ``model``, ``sha256``, ``hardware_id``, ``rollout_id``,
  ``predicted`` (str, empty when none), ``stage`` (int64, -1 outside a rollout),
  ``ts`` (datetime64[ms]).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.commands.common import (
    EXIT_USAGE,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api,
    client,
    console,
    fail,
    print_json,
    shows_progress,
    warn,
)

data_app = typer.Typer(
    help="Export captured inferences and their labels for retraining.", no_args_is_help=True
)

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``7d``, ``12h``, ``30m`` (ago) or an ISO 8601 time with an offset."""
    m = _DURATION.match(text.strip())
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=int(m.group(1)) * _UNIT[m.group(2)])
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since takes a duration (7d, 12h, 30m) or an ISO 8601 time, got {text!r}", EXIT_USAGE)
    if t.tzinfo is None:
        fail(f"--since {text!r} needs an offset (e.g. Z)", EXIT_USAGE)
    return t


def _array(t: dict[str, Any]) -> Any:
    import numpy as np

    return np.frombuffer(base64.b64decode(t["data"]), np.dtype(t["dtype"]).newbyteorder("<")).reshape(
        t["shape"]
    )


def _stack(name: str, arrays: list[Any]) -> Any | None:
    import numpy as np

    if any(a is None for a in arrays):
        warn(f"{name}: not captured for every row, left out")
        return None
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        warn(f"{name}: shapes differ between rows ({len(shapes)} shapes), left out")
        return None
    return np.stack(arrays)


def _labels(values: list[Any]) -> Any:
    import numpy as np

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return np.array([-1 if v is None else v for v in values], dtype=np.int64)
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


def columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows of ``GET /api/v1/captures`` as the arrays of the ``.npz`` (see the module doc)."""
    import numpy as np

    def times(values: list[str | None]) -> Any:
        return np.array(
            [
                np.datetime64(v.replace("Z", "+00:00")[:23], "ms") if v else np.datetime64("NaT")
                for v in values
            ],
            dtype="datetime64[ms]",
        )

    first = [r["labels"][0] if r["labels"] else None for r in rows]
    out: dict[str, Any] = {
        name: np.array([str(r[name] or "") for r in rows], dtype=str)
        for name in ("inference_id", "device_id", "model", "sha256", "hardware_id", "rollout_id", "predicted")
    }
    out["stage"] = np.array([-1 if r["stage"] is None else r["stage"] for r in rows], dtype=np.int64)
    out["ts"] = times([_utc(r["ts"]) for r in rows])
    out["label"] = _labels([f["label"] if f else None for f in first])
    out["label_present"] = np.array([f is not None for f in first], dtype=bool)
    out["label_source"] = np.array([f["source"] if f else "" for f in first], dtype=str)
    out["label_time"] = times([_utc(f["label_time"]) if f else None for f in first])
    names = sorted({n for r in rows for n in (r["inputs"] or {})})
    for n in names:
        stacked = _stack(
            f"input {n}", [_array(r["inputs"][n]) if n in (r["inputs"] or {}) else None for r in rows]
        )
        if stacked is not None:
            out[f"input_{n}"] = stacked
    width = max((len(r["outputs"] or []) for r in rows), default=0)
    for i in range(width):
        outs = [_array(r["outputs"][i]) if len(r["outputs"] or []) > i else None for r in rows]
        stacked = _stack(f"output {i}", outs)
        if stacked is not None:
            out[f"output_{i}"] = stacked
    return out


def _utc(text: str) -> str:
    """An ISO time as naive UTC text (numpy's datetime64 takes no offsets)."""
    return (
        datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).replace(tzinfo=None).isoformat()
    )


def _pages(conn: Any, params: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    cursor: str | None = None
    while True:
        page = api(partial(conn.page, "/api/v1/captures", **params, limit=1000, cursor=cursor))
        yield page["items"]
        cursor = page.get("next")
        if cursor is None:
            return


@data_app.command("export")
def data_export(
    model: Annotated[str, typer.Option("--model", help="A model family (every version) or name:version.")],
    out: Annotated[Path, typer.Option("--out", help="The .npz file to write.")],
    since: Annotated[
        str | None, typer.Option("--since", help="Only inferences since: 7d, 12h, 30m, or an ISO 8601 time.")
    ] = None,
    labeled: Annotated[bool, typer.Option("--labeled", help="Only inferences with a label.")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Join captured inferences with their labels (model version, cohort, device, times as columns)
    into one .npz, with a progress bar; ``numpy.load(out)`` reads it without pickles."""
    import numpy as np

    params: dict[str, Any] = {"model": model, "labeled": labeled}
    if since is not None:
        params["since"] = parse_since(since).isoformat()
    rows: list[dict[str, Any]] = []
    with client(server, token) as conn:
        if shows_progress():
            from rich.progress import Progress, SpinnerColumn, TextColumn

            with Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True) as bar:
                task = bar.add_task("fetching captures", total=None)
                for items in _pages(conn, params):
                    rows += items
                    bar.update(task, description=f"fetched {len(rows):,} captured inferences")
        else:
            for items in _pages(conn, params):
                rows += items
    if not rows:
        fail(
            f"no captured inferences of {model} match (labeled={labeled}, since={since})",
            code="empty_dataset",
        )
    arrays = columns(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:
        np.savez(fh, **arrays)
    summary: dict[str, Any] = {
        "out": str(out),
        "rows": len(rows),
        "labeled": int(arrays["label_present"].sum()),
        "columns": sorted(arrays),
        "models": sorted(set(arrays["model"].tolist())),
    }
    if as_json:
        print_json(summary)
        return
    console.print(
        f"[green]wrote[/] {out}: {summary['rows']:,} rows ({summary['labeled']:,} labelled) of"
        f" {', '.join(summary['models'])}; columns {', '.join(summary['columns'])}",
        highlight=False,
    )

"""Where the suite's time goes: per test, its wall time against the CPU it cost.

Enabled with ``--probe-times=PATH`` (or ``EDGEFLEET_TEST_PROBE=PATH``), off otherwise. For each
test (setup, call and teardown together) it records the wall time, the CPU of the pytest process
(all its threads: the agents, servers and brokers' clients a test runs in-process) and the CPU
of the child processes reaped meanwhile (``RUSAGE_CHILDREN``: server subprocesses, the CLI,
compilers). A long test with little CPU is waiting on something; a test with much CPU is work.

Each process (an xdist worker, or the one process of a plain run) appends JSON lines to
``PATH.<worker>.jsonl``; the process that ends the run merges them into ``PATH`` as a table
sorted by CPU, with a second table sorted by wall time. ``python -m tests.support.timing_probe
PATH`` rebuilds the table from the JSON lines. CPU of processes the test did not reap (the
session's Mosquitto, PostgreSQL) is not counted; on a machine shared with other jobs the wall
figures are noisy and the CPU figures are the ones to compare.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

import pytest

ENV = "EDGEFLEET_TEST_PROBE"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--probe-times",
        metavar="PATH",
        default=os.environ.get(ENV),
        help=f"record each test's wall time and CPU (own + reaped children) into PATH (or ${ENV})",
    )


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def _worker(config: pytest.Config) -> str:
    return str(getattr(config, "workerinput", {}).get("workerid", "main"))


def _probe_path(config: pytest.Config) -> Path | None:
    value = config.getoption("--probe-times")
    return Path(value).resolve() if value else None


def pytest_configure(config: pytest.Config) -> None:
    path = _probe_path(config)
    if path is None or hasattr(config, "workerinput"):
        return
    # The controller (or the single process) starts from no earlier run's lines.
    for old in path.parent.glob(f"{path.name}.*.jsonl"):
        old.unlink()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, None]:
    path = _probe_path(item.config)
    if path is None:
        yield
        return
    wall0 = time.perf_counter()
    own0, kids0 = _cpu()
    yield
    own1, kids1 = _cpu()
    row = {
        "test": item.nodeid,
        "worker": _worker(item.config),
        "start": round(time.time() - (time.perf_counter() - wall0), 3),
        "wall": round(time.perf_counter() - wall0, 3),
        "cpu_self": round(own1 - own0, 3),
        "cpu_children": round(kids1 - kids0, 3),
        "slow": item.get_closest_marker("slow") is not None,
    }
    with open(f"{path}.{row['worker']}.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    path = _probe_path(config)
    if path is None or hasattr(config, "workerinput"):
        return
    rows = load(path)
    if rows:
        path.write_text(table(rows), encoding="utf-8")


def load(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for part in sorted(path.parent.glob(f"{path.name}.*.jsonl")):
        rows.extend(json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line)
    return rows


def table(rows: Iterable[dict[str, Any]], top: int = 60) -> str:
    rows = list(rows)
    wall = sum(r["wall"] for r in rows)
    own = sum(r["cpu_self"] for r in rows)
    kids = sum(r["cpu_children"] for r in rows)
    head = f"{'cpu':>8} {'self':>8} {'child':>8} {'wall':>8} {'wait':>8}  test"
    lines = [
        f"{len(rows)} tests: wall {wall:.1f} s, CPU {own + kids:.1f} s "
        f"({own:.1f} s own, {kids:.1f} s children)",
        "",
    ]

    def fmt(r: dict[str, Any]) -> str:
        cpu = r["cpu_self"] + r["cpu_children"]
        return (
            f"{cpu:8.2f} {r['cpu_self']:8.2f} {r['cpu_children']:8.2f} {r['wall']:8.2f} "
            f"{max(r['wall'] - cpu, 0.0):8.2f}  {r['test']}"
        )

    for title, key in (
        ("by CPU", lambda r: r["cpu_self"] + r["cpu_children"]),
        ("by wall", lambda r: r["wall"]),
        ("by waiting (wall - CPU)", lambda r: r["wall"] - r["cpu_self"] - r["cpu_children"]),
    ):
        lines += [f"## top {top} {title}", head]
        lines += [fmt(r) for r in sorted(rows, key=key, reverse=True)[:top]]
        lines.append("")
    by_module: dict[str, list[float]] = {}
    for r in rows:
        agg = by_module.setdefault(r["test"].split("::", 1)[0], [0.0, 0.0, 0.0])
        agg[0] += r["cpu_self"] + r["cpu_children"]
        agg[1] += r["wall"]
        agg[2] += 1
    lines += ["## modules by CPU", f"{'cpu':>8} {'wall':>8} {'tests':>6}  module"]
    for module, (cpu, w, n) in sorted(by_module.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{cpu:8.2f} {w:8.2f} {int(n):6d}  {module}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table(load(Path(sys.argv[1]).resolve())))

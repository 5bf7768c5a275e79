"""``python -m bench``: run every benchmark and print one table (ratios vs same-run baselines).

``python -m bench verify inference`` runs only the named modules.
"""

from __future__ import annotations

import importlib
import platform
import sys

from rich.console import Console
from rich.table import Table

MODULES = [
    "verify",
    "trust",
    "inference",
    "agent",
    "compiler",
    "server",
    "labels",
    "sim",
    "scale",
    "gates",
    "experiments",
    "slo",
    "console",
    "acceptance",
    "delta",
    "deploy",
    "delivery",
]
STANDARD = {"bench", "baseline", "ratio", "target"}


def main(argv: list[str]) -> int:
    names = argv or MODULES
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    rows: list[dict[str, object]] = []
    for name in names:
        rows.extend(importlib.import_module(f"bench.{name}").run())
    console = Console(width=200)
    table = Table(
        "bench",
        "baseline",
        "baseline",
        "edgefleet",
        "ratio",
        "target",
        "more figures",
        title=f"edgefleet benchmarks on {platform.machine()} / {platform.python_version()}",
    )
    for r in rows:
        unit = next((u for u in ("us", "ms", "kb", "mb", "s", "pct", "req") if f"baseline_{u}" in r), "ms")
        extra = {
            k: v for k, v in r.items() if k not in STANDARD and not k.startswith(("baseline_", "edgefleet_"))
        }
        table.add_row(
            str(r["bench"]),
            str(r["baseline"]),
            f"{r.get('baseline_' + unit)} {unit}",
            f"{r.get('edgefleet_' + unit)} {unit}",
            str(r["ratio"]),
            str(r["target"]),
            " ".join(f"{k}={v}" for k, v in extra.items() if v is not None),
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

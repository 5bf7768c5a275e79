"""``python -m bench``: run every benchmark and print one table (ratios vs same-run baselines)."""

from __future__ import annotations

import platform
import sys

from rich.console import Console
from rich.table import Table


def main() -> int:
    from bench import inference, verify

    rows: list[dict[str, object]] = []
    for module in (verify, inference):
        rows.extend(module.run())
    console = Console(width=140)
    table = Table(
        "bench",
        "baseline",
        "baseline",
        "edgefleet",
        "ratio",
        "target",
        title=f"edgefleet benchmarks on {platform.machine()} / {platform.python_version()}",
    )
    for r in rows:
        unit = "us" if "baseline_us" in r else "ms"
        table.add_row(
            str(r["bench"]),
            str(r["baseline"]),
            f"{r.get('baseline_' + unit)} {unit}",
            f"{r.get('edgefleet_' + unit)} {unit}",
            str(r["ratio"]),
            str(r["target"]),
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

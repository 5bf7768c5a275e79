"""What the devices' acceptance checks measured, per hardware class, beside what was compiled.

Each agent runs its bundle's signed golden set on its own runtime before the swap
(``device_agent.acceptance``) and reports the verdict and figures in its retained
``reported`` snapshot (``acceptance``: model sha256 -> verdict), which the server
keeps per device. This module groups those by hardware id for one model: how many
devices passed or refused it, and per figure the median and worst measured value
next to the host's compiled one -- the line a model report shows ("snr_db: compiled
39.6 on the host; measured 39.6 on 40 rpi4 devices"). A refusal also reaches the
rollout as a failed device (``acceptance_failed``), which its failure-rate gate counts.

``summarize`` is pure; ``model_acceptance`` reads the devices that reported on the model.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from sqlmodel import Session, col, select

from fleet_server.models import Device
from fleet_server.releases import get_model


def summarize(
    section: Mapping[str, Any] | None, reports: Iterable[tuple[str, Mapping[str, Any]]]
) -> dict[str, Any]:
    """``section``: the manifest's acceptance section (None: the bundle has no golden set);
    ``reports``: (hardware id, one device's verdict) pairs."""
    compiled = {(c["output"], c["figure"]): c for c in (section or {}).get("checks", [])}
    groups: dict[str, dict[str, Any]] = {}
    for hardware_id, verdict in reports:
        g = groups.setdefault(hardware_id, {"devices": 0, "passed": 0, "refused": 0, "values": {}})
        g["devices"] += 1
        g["passed" if verdict.get("passed") else "refused"] += 1
        for check in verdict.get("checks") or []:
            value = check.get("measured")
            if isinstance(value, (int, float)):
                g["values"].setdefault((check["output"], check["figure"]), []).append(float(value))
    hardware = []
    lines = []
    for hardware_id in sorted(groups):
        g = groups[hardware_id]
        figures = []
        for (output, figure), values in sorted(g["values"].items()):
            c = compiled.get((output, figure), {})
            worst = min(values) if c.get("bound", "min") == "min" else max(values)
            median = statistics.median(values)
            figures.append(
                {
                    "output": output,
                    "figure": figure,
                    "compiled": c.get("compiled"),
                    "tolerance": c.get("tolerance"),
                    "measured_median": round(median, 6),
                    "measured_worst": round(worst, 6),
                    "devices": len(values),
                }
            )
            host = f"compiled {c['compiled']:.4g} on the host; " if "compiled" in c else ""
            lines.append(
                f"{output}.{figure}: {host}measured {median:.4g} (worst {worst:.4g}) on {len(values)} "
                f"{hardware_id} device{'s' if len(values) != 1 else ''}"
            )
        hardware.append(
            {
                "hardware_id": hardware_id,
                "devices": g["devices"],
                "passed": g["passed"],
                "refused": g["refused"],
                "figures": figures,
            }
        )
    return {
        "golden_samples": (section or {}).get("samples"),
        "golden_bytes": (section or {}).get("bytes"),
        "compiled": list(compiled.values()),
        "hardware": hardware,
        "summary": lines,
    }


def model_acceptance(session: Session, name: str, version: str) -> dict[str, Any]:
    """The acceptance figures of ``name:version`` from every device that reported a check of it."""
    model = get_model(session, name, version)
    rows = session.exec(select(Device.hardware_id, Device.reported).where(col(Device.reported).is_not(None)))
    reports = []
    for hardware_id, reported in rows:
        verdict = ((reported or {}).get("acceptance") or {}).get(model.sha256)
        if isinstance(verdict, dict):
            reports.append((hardware_id, verdict))
    section = (model.manifest.get("quantization") or {}).get("acceptance")
    return {"model": f"{name}:{version}", "sha256": model.sha256, **summarize(section, reports)}

"""Values as a person reads them in a summary table or a check's detail, never as a Python repr.

The run's figures, the demo's figures and the checks' details hold nested data (counts per
class, device states per rollout, per-process memory); ``str()`` of those is ``{'rpi4': 18}``.
:func:`readable` writes a flat mapping as ``rpi4=18, jetson=6``, a nested one as
``broken: pending=22, rolled_back=2; baseline: done=24``, a list as ``a, b``, nothing as ``-``.
The JSON outputs keep the data itself; this is for the tables only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["readable"]

FLOAT_DIGITS = 4  # enough for accuracies and seconds; more is noise in a summary


def readable(value: Any) -> str:
    """``value`` as one line of plain text (no brackets, braces or quotes added)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return str(round(value, FLOAT_DIGITS))
    if isinstance(value, Mapping):
        if not value:
            return "-"
        if any(isinstance(v, Mapping | list | tuple) for v in value.values()):
            return "; ".join(f"{k}: {readable(v)}" for k, v in value.items())
        return ", ".join(f"{k}={readable(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        sep = "; " if any(isinstance(v, Mapping) for v in items) else ", "
        return sep.join(readable(v) for v in items) or "-"
    return str(value)

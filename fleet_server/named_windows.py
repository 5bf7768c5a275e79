"""Named maintenance windows: the applied ``MaintenanceWindow`` documents, and a rollout
policy's window names replaced by their windows when a rollout or an experiment is created (the
rollout keeps the windows themselves: a later change of the document applies to later rollouts)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from sqlmodel import Session, col, select

from fleet_server import declarative, policy
from fleet_server.declarative import WINDOW_KIND
from fleet_server.errors import Invalid
from fleet_server.models import ConfigDocument


def applied_windows(session: Session, names: Iterable[str]) -> dict[str, list[policy.WindowPolicy]]:
    """The applied ``MaintenanceWindow`` documents of these names (those that exist), by name."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    rows = session.exec(
        select(ConfigDocument).where(
            col(ConfigDocument.kind) == WINDOW_KIND, col(ConfigDocument.name).in_(wanted)
        )
    ).all()
    out = {}
    for row in rows:
        spec = declarative.parse_document(row.body).spec
        assert isinstance(spec, declarative.MaintenanceWindowSpec)
        out[row.name] = list(spec.windows)
    return out


P = TypeVar("P", bound=policy.Policy)


def resolve_windows(session: Session, pol: P) -> P:
    """``pol`` with its window names replaced by the applied ``MaintenanceWindow`` documents'
    windows, as a rollout is created; an unknown name is refused."""
    names = policy.window_names(pol)
    if not names:
        return pol
    named = applied_windows(session, names)
    missing = [n for n in names if n not in named]
    if missing:
        raise Invalid(
            "unknown_maintenance_window",
            f"maintenance_windows: no MaintenanceWindow {', '.join(map(repr, missing))} has been applied"
            " (declare it in a fleet file and edgefleet apply it)",
        )
    return policy.resolve_windows(pol, named)


__all__ = ["applied_windows", "resolve_windows"]

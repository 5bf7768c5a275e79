"""SLOs, alerts, planned-rollout windows and the error-budget policy, as the API serves them.

The policy: a model one of whose SLOs has spent an objective's budget gets no
new rollout, unless the rollout goes back to an older release than the newest
one rolled out before (a rollback always goes), or a person has overridden the
policy for the model with a reason (an ``BudgetOverride`` row, and the call is
in the audit log with that reason). Budgets are evaluated from the stored
samples at the moment of the request, on any replica.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from fleet_server.errors import Conflict, Invalid, NotFound
from fleet_server.models import (
    AlertDelivery,
    BudgetOverride,
    Model,
    PlannedWindow,
    Rollout,
    Slo,
    SloAlert,
    utcnow,
)
from fleet_server.paging import DEFAULT_LIMIT, Page, select_page
from fleet_server.slo.burn import SloStatus, evaluate
from fleet_server.slo.spec import SloSpec, format_duration, spec_as_dict, spec_from
from fleet_server.slo_schemas import (
    ObjectiveStatusOut,
    OverrideIn,
    PlannedWindowIn,
    RuleStatusOut,
    SloIn,
    SloOut,
    SloStatusOut,
)
from fleet_server.slo_store import at, epoch, load_samples, spec_of


def _spec(body: SloIn) -> SloSpec:
    data = body.model_dump(exclude_none=True)
    for o in data["objectives"]:
        if o.get("min_events") is None:
            o.pop("min_events", None)
    try:
        return spec_from(data)
    except ValueError as exc:
        raise Invalid("invalid_slo", str(exc)) from None


def create_slo(session: Session, body: SloIn, actor: str) -> Slo:
    spec = _spec(body)
    if session.get(Slo, spec.name) is not None:
        raise Conflict("slo_exists", f"an SLO named {spec.name} exists")
    row = Slo(
        name=spec.name,
        model=spec.model,
        hardware_id=spec.hardware_id,
        spec=spec_as_dict(spec),
        created_by=actor,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict("slo_exists", f"an SLO named {spec.name} exists") from None
    return row


def put_slo(session: Session, body: SloIn, actor: str) -> Slo:
    """Create the SLO, or change its objectives, rules and labels in place (a declared SLO).

    Its model and cohort stay: the stored samples and alerts are theirs, so another model or
    cohort is another SLO (409 ``slo_cohort_changed``)."""
    row = session.get(Slo, body.name)
    if row is None:
        return create_slo(session, body, actor)
    spec = _spec(body)
    if (row.model, row.hardware_id) != (spec.model, spec.hardware_id):
        raise Conflict(
            "slo_cohort_changed",
            f"SLO {spec.name} measures {row.model} on {row.hardware_id or 'every cohort'}: another model or"
            " cohort is another SLO (give it another name)",
        )
    row.spec = spec_as_dict(spec)
    session.add(row)
    return row


def find_slo(session: Session, name: str) -> Slo:
    row = session.get(Slo, name)
    if row is None:
        raise NotFound("slo_not_found", f"no SLO {name}")
    return row


def list_slos(
    session: Session, model: str | None, *, cursor: str | None, limit: int = DEFAULT_LIMIT
) -> Page[Slo]:
    query = select(Slo)
    if model is not None:
        query = query.where(col(Slo.model) == model)
    return select_page(session, query, [col(Slo.created_at), col(Slo.name)], "slos", cursor, limit)


def slo_out(row: Slo) -> SloOut:
    return SloOut.model_validate({**row.spec, "created_at": row.created_at, "created_by": row.created_by})


def status_of(session: Session, row: Slo, now: datetime) -> tuple[SloStatus, int]:
    """The SLO evaluated over its stored samples, at ``now`` or at its latest sample if that is later
    (the leader's clock may run ahead of this replica's)."""
    samples = load_samples(session, row.name)
    t = max([epoch(now), samples[-1].t] if samples else [epoch(now)])
    return evaluate(spec_of(row), samples, t), len(samples)


def status_out(status: SloStatus, samples: int) -> SloStatusOut:
    spec = status.spec
    return SloStatusOut(
        name=spec.name,
        model=spec.model,
        hardware_id=spec.hardware_id,
        at=at(status.at),
        samples=samples,
        budget_spent=status.budget_spent,
        severity=status.severity(),
        objectives=[
            ObjectiveStatusOut(
                sli=str(o.objective.sli),
                target=o.objective.target,
                window=format_duration(o.objective.window_s),
                threshold=o.objective.threshold,
                value=o.sli,
                events=o.events,
                bad=o.bad,
                budget_remaining=o.budget_remaining,
                rules=[
                    RuleStatusOut(
                        name=r.rule.name,
                        severity=str(r.rule.severity),
                        factor=r.rule.factor,
                        long_burn=r.long_burn,
                        short_burn=r.short_burn,
                        breaching=r.breaching,
                    )
                    for r in o.rules
                ],
            )
            for o in status.objectives
        ],
    )


def list_alerts(
    session: Session, state: str | None, *, cursor: str | None, limit: int = DEFAULT_LIMIT
) -> Page[SloAlert]:
    query = select(SloAlert)
    if state is not None:
        query = query.where(col(SloAlert.state) == state)
    return select_page(session, query, [col(SloAlert.id)], "alerts", cursor, limit)


def list_deliveries(
    session: Session, alert_id: str | None, *, cursor: str | None, limit: int = DEFAULT_LIMIT
) -> Page[AlertDelivery]:
    query = select(AlertDelivery)
    if alert_id is not None:
        query = query.where(col(AlertDelivery.alert_id) == alert_id)
    return select_page(session, query, [col(AlertDelivery.id)], "deliveries", cursor, limit)


def create_window(session: Session, body: PlannedWindowIn, actor: str, now: datetime) -> PlannedWindow:
    starts = body.starts or now
    if starts.tzinfo is None:
        raise Invalid("invalid_window", "starts needs a time zone (like 2026-03-14T09:00:00Z)")
    row = PlannedWindow(
        model=body.model,
        hardware_id=body.hardware_id,
        starts=starts,
        ends=starts + timedelta(minutes=body.minutes),
        reason=body.reason,
        created_by=actor,
    )
    session.add(row)
    session.flush()
    return row


def list_windows(
    session: Session, model: str | None, *, cursor: str | None, limit: int = DEFAULT_LIMIT
) -> Page[PlannedWindow]:
    query = select(PlannedWindow)
    if model is not None:
        query = query.where(col(PlannedWindow.model) == model)
    return select_page(session, query, [col(PlannedWindow.id)], "windows", cursor, limit)


def create_override(
    session: Session, model: str, body: OverrideIn, actor: str, now: datetime
) -> BudgetOverride:
    if session.exec(select(Model.id).where(Model.name == model)).first() is None:
        raise NotFound("model_not_found", f"no model named {model}")
    row = BudgetOverride(
        model=model,
        reason=body.reason,
        actor=actor,
        created_at=now,
        expires_at=now + timedelta(hours=body.hours),
    )
    session.add(row)
    session.flush()
    return row


def spent_budgets(session: Session, model: str, now: datetime) -> list[str]:
    """The SLOs of ``model`` whose budget is spent, with the objectives that spent it."""
    out = []
    for row in session.exec(select(Slo).where(Slo.model == model)).all():
        status, _ = status_of(session, row, now)
        spent = [str(o.objective.sli) for o in status.objectives if o.budget_spent]
        if spent:
            out.append(f"{row.name} ({', '.join(spent)})")
    return out


def check_budget_policy(session: Session, model: Model, now: datetime) -> BudgetOverride | None:
    """Refuse a new rollout of ``model`` whose budget is spent (409 ``error_budget_spent``), unless it
    goes back to an older release or an override holds; returns the override that let it through."""
    spent = spent_budgets(session, model.name, now)
    if not spent:
        return None
    newest_rolled = session.exec(
        select(func.max(Model.release))
        .join(Rollout, col(Rollout.model_id) == col(Model.id))
        .where(Model.name == model.name)
    ).first()
    if newest_rolled is not None and model.release < newest_rolled:
        return None  # a rollback to an older release always goes
    override = session.exec(
        select(BudgetOverride)
        .where(BudgetOverride.model == model.name, col(BudgetOverride.expires_at) > now)
        .order_by(col(BudgetOverride.created_at).desc())
    ).first()
    if override is not None:
        return override
    raise Conflict(
        "error_budget_spent",
        f"{model.name}'s error budget is spent ({'; '.join(spent)}): a rollback to an older release goes;"
        f" a new one needs an override with a reason (edgefleet slo override {model.name} --reason ...)",
    )


def now_utc() -> datetime:
    return utcnow()

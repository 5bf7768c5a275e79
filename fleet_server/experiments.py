"""A/B experiments between model versions: creating one, its status with per-arm figures, stopping
an arm or the whole experiment, and the leader's evaluation on every tick (guardrail stops, the
winner, auto-promote). The decisions are ``fleet_server.experiment_core``'s (pure); this is the I/O.

How an experiment coexists with rollouts (docs/experiments.md):

- Its devices are reserved while it runs: they must be in no active rollout when it is created
  (409 ``experiment_conflict``), and a rollout created while it runs leaves them out or is refused
  as for any busy device (``rollouts.busy_devices``); no rollout enrols them as joiners.
- Each arm's version reaches its devices through an ordinary rollout of one stage (100%) of
  exactly those devices, under the experiment's rollout policy: the same signed directives,
  retries, timeouts, probation and health gates as any rollout. Such a rollout enrols no joiners.
- Stopping an arm (a guardrail, or an operator) aborts its rollout and starts one more rollout of
  the control version to its devices: they go back to the control.
- A winner proven with ``auto_promote`` ends the experiment and rolls the winner out to the whole
  selector (busy devices left out): the experiment's own devices included.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from fleet_server import experiment_core as core
from fleet_server import policy as rollout_policy
from fleet_server.engine import assignment_order
from fleet_server.errors import Conflict, DomainError, NotFound
from fleet_server.experiment_schemas import (
    ArmOut,
    EffectOut,
    ExperimentDecisionOut,
    ExperimentIn,
    ExperimentOut,
    MetricOut,
)
from fleet_server.experiment_stats import Moments
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.models import (
    Device,
    Experiment,
    ExperimentArm,
    ExperimentDecision,
    ExperimentDevice,
    Model,
    ModelAggregate,
    OutcomeAggregate,
    Rollout,
    RolloutDecision,
    RolloutDevice,
    utcnow,
)
from fleet_server.named_windows import resolve_windows
from fleet_server.paging import DEFAULT_LIMIT, Page, select_page
from fleet_server.policy import Policy
from fleet_server.rollouts import busy_devices, create_rollout, operator_action
from fleet_server.schemas import RolloutIn
from fleet_server.selector import matches
from fleet_server.store import assignment_lock_first, hold_assignment_lock

log = logging.getLogger(__name__)

RUNNING, STOPPED, COMPLETED, DONE = "running", "stopped", "completed", "done"


def _model(session: Session, ref: str) -> Model:
    name, version = ref.split(":", 1)
    model = session.exec(select(Model).where(Model.name == name, Model.version == version)).first()
    if model is None or model.id is None:
        raise NotFound("model_not_found", f"no model {ref}")
    return model


def reserved_devices(session: Session, device_ids: Sequence[str]) -> list[tuple[str, str]]:
    """(device, experiment) pairs of the given devices that a running experiment holds."""
    if not device_ids:
        return []
    rows = session.exec(
        select(ExperimentDevice.device_id, ExperimentDevice.experiment_id)
        .join(Experiment, col(Experiment.id) == col(ExperimentDevice.experiment_id))
        .where(col(Experiment.state) == RUNNING, col(ExperimentDevice.device_id).in_(list(device_ids)))
    ).all()
    return [(d, e) for d, e in rows]


def spec_of(exp: Experiment) -> core.Spec:
    s = exp.spec
    return core.Spec(
        control=exp.control,
        metric=s.get("metric", core.ACCURACY),
        better=s.get("better"),
        alpha=float(s.get("alpha", 0.05)),
        min_samples=int(s.get("min_samples", 200)),
        design_samples=int(s.get("design_samples", 1000)),
        guardrails=tuple(
            core.Guardrail(g["metric"], float(g.get("max_harm", 0.0)), g.get("better"))
            for g in s.get("guardrails", [])
        ),
    )


def create_experiment(session: Session, req: ExperimentIn) -> Experiment:
    req = req.model_copy(update={"policy": resolve_windows(session, req.policy)})
    models = {a.name: _model(session, a.model) for a in req.arms}
    selector = req.selector.model_dump()
    hold_assignment_lock(session)  # until the experiment's devices are committed (store.py)
    # a device takes part only if every arm's version may run on it
    targeted = [
        d
        for d in session.exec(select(Device)).all()
        if all(matches(d, selector, m.hardware_ids) for m in models.values())
    ]
    if not targeted:
        raise DomainError(
            "no_matching_devices", "no registered device matches the selector and every arm's hardware ids"
        )
    ids = [d.id for d in targeted]
    busy = busy_devices(session, ids)
    if busy:
        others = sorted({r for _, r in busy})
        raise Conflict(
            "experiment_conflict",
            f"{len(busy)} selected device(s) are in active rollout(s) or running experiment(s)"
            f" {', '.join(others)}: wait for them to finish, or narrow the selector",
        )
    now = utcnow()
    exp_id = uuid.uuid4().hex[:12]
    arms = core.assign(
        exp_id, [(d.id, d.hardware_id) for d in targeted], [(a.name, a.weight) for a in req.arms]
    )
    per_arm = {a.name: sorted(d for d, arm in arms.items() if arm == a.name) for a in req.arms}
    empty = [name for name, devs in per_arm.items() if not devs]
    if empty:
        raise DomainError(
            "too_few_devices",
            f"{len(targeted)} device(s) leave arm(s) {', '.join(empty)} without a device: add devices or"
            " change the weights",
        )
    exp = Experiment(
        id=exp_id,
        name=req.name,
        selector=selector,
        control=req.control_arm,
        spec={
            "metric": req.metric,
            "better": req.better,
            "alpha": req.alpha,
            "min_samples": req.min_samples,
            "design_samples": req.design_samples,
            "guardrails": [g.model_dump() for g in req.guardrails],
        },
        policy=req.policy.model_dump(mode="json"),
        auto_promote=req.auto_promote,
        created_at=now,
        updated_at=now,
    )
    session.add(exp)
    session.flush()
    hardware = {d.id: d.hardware_id for d in targeted}
    for a in req.arms:
        model = models[a.name]
        starts = _counts_now(session, per_arm[a.name], model.sha256)
        for device_id in per_arm[a.name]:
            session.add(
                ExperimentDevice(
                    experiment_id=exp_id,
                    device_id=device_id,
                    arm=a.name,
                    hardware_id=hardware[device_id],
                    start=_counts_json(starts.get(device_id, core.Counts())),
                )
            )
        rollout = _start_rollout(
            session, model, selector, per_arm[a.name], req.policy, f"experiment {exp_id}: arm {a.name}"
        )
        session.add(
            ExperimentArm(
                experiment_id=exp_id,
                name=a.name,
                model_id=model.id,  # type: ignore[arg-type]  # _model checked it
                model_ref=a.model,
                model_sha256=model.sha256,
                weight=a.weight,
                rollout_id=rollout.id,
            )
        )
    split = {
        a.name: {
            hw: sum(1 for d in per_arm[a.name] if hardware[d] == hw) for hw in sorted(set(hardware.values()))
        }
        for a in req.arms
    }
    _decide(
        session, exp, "created", f"{len(targeted)} device(s) split over {len(req.arms)} arms", {"arms": split}
    )
    return exp


def _start_rollout(
    session: Session, model: Model, selector: dict[str, Any], device_ids: Sequence[str], pol: Policy, why: str
) -> Rollout:
    """A one-stage rollout of ``model`` to exactly ``device_ids`` (the experiment's own: it enrols no
    joiners, ``rollouts.enrol_joiners``)."""
    now = utcnow()
    rollout = Rollout(
        id=uuid.uuid4().hex[:12],
        model_id=model.id,  # type: ignore[arg-type]
        model_ref=f"{model.name}:{model.version}",
        model_sha256=model.sha256,
        selector=selector,
        stages=[100.0],
        stage_unit="percent",
        **rollout_policy.to_row(pol),
        created_at=now,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()
    for d in device_ids:
        session.add(
            RolloutDevice(
                rollout_id=rollout.id, device_id=d, order_key=assignment_order(rollout.id, d), updated_at=now
            )
        )
    session.add(
        RolloutDecision(
            rollout_id=rollout.id,
            ts=now,
            action="created",
            reason=f"{why}: {len(device_ids)} device(s)",
            figures={"targeted": len(device_ids), "stages": [100.0]},
        )
    )
    return rollout


def _counts_json(c: core.Counts) -> dict[str, Any]:
    return {
        "inferences": c.inferences,
        "errors": c.errors,
        "labels": c.labels,
        "labels_correct": c.labels_correct,
        "latency": list(c.latency),
        "outcomes": {k: [m.n, m.total, m.total_sq] for k, m in c.outcomes.items()},
    }


def _counts_from(doc: dict[str, Any]) -> core.Counts:
    return core.Counts(
        inferences=int(doc.get("inferences", 0)),
        errors=int(doc.get("errors", 0)),
        labels=int(doc.get("labels", 0)),
        labels_correct=int(doc.get("labels_correct", 0)),
        latency=[int(v) for v in doc.get("latency", [])],
        outcomes={
            k: Moments(int(v[0]), float(v[1]), float(v[2])) for k, v in doc.get("outcomes", {}).items()
        },
    )


def _counts_now(session: Session, device_ids: Sequence[str], sha256: str) -> dict[str, core.Counts]:
    """Each device's cumulative counts of ``sha256``, as the telemetry ingest keeps them."""
    out: dict[str, core.Counts] = {}
    ids = list(device_ids)
    for chunk in range(0, len(ids), 5000):
        part = ids[chunk : chunk + 5000]
        conn = session.connection()
        for device_id, inferences, errors, labels, correct, latency in conn.execute(
            sa_select(
                col(ModelAggregate.device_id),
                col(ModelAggregate.inferences),
                col(ModelAggregate.errors),
                col(ModelAggregate.labels),
                col(ModelAggregate.labels_correct),
                col(ModelAggregate.latency_buckets),
            ).where(col(ModelAggregate.sha256) == sha256, col(ModelAggregate.device_id).in_(part))
        ).all():
            out[device_id] = core.Counts(
                inferences=inferences,
                errors=errors,
                labels=labels,
                labels_correct=correct,
                latency=list(latency),
            )
        for device_id, metric, n, total, total_sq in conn.execute(
            sa_select(
                col(OutcomeAggregate.device_id),
                col(OutcomeAggregate.metric),
                col(OutcomeAggregate.n),
                col(OutcomeAggregate.total),
                col(OutcomeAggregate.total_sq),
            ).where(col(OutcomeAggregate.sha256) == sha256, col(OutcomeAggregate.device_id).in_(part))
        ).all():
            out.setdefault(device_id, core.Counts()).outcomes[metric] = Moments(n, total, total_sq)
    return out


def arm_counts(session: Session, exp: Experiment) -> dict[str, dict[str, core.Counts]]:
    """arm -> hardware cohort -> what its devices measured on the arm's model since they joined."""
    arms = {a.name: a for a in _arms(session, exp)}
    members = session.exec(select(ExperimentDevice).where(ExperimentDevice.experiment_id == exp.id)).all()
    out: dict[str, dict[str, core.Counts]] = {name: {} for name in arms}
    for name, arm in arms.items():
        mine = [m for m in members if m.arm == name]
        now = _counts_now(session, [m.device_id for m in mine], arm.model_sha256)
        for m in mine:
            since = now.get(m.device_id, core.Counts()).minus(_counts_from(m.start))
            since.devices = 1
            out[name].setdefault(m.hardware_id, core.Counts()).add(since)
    return out


def _arms(session: Session, exp: Experiment) -> list[ExperimentArm]:
    return list(
        session.exec(
            select(ExperimentArm).where(ExperimentArm.experiment_id == exp.id).order_by(col(ExperimentArm.id))
        ).all()
    )


def _decide(session: Session, exp: Experiment, action: str, reason: str, figures: dict[str, Any]) -> None:
    session.add(
        ExperimentDecision(experiment_id=exp.id, ts=utcnow(), action=action, reason=reason, figures=figures)
    )
    log.info("experiment %s: %s: %s", exp.id, action, reason)


def find_experiment(session: Session, experiment_id: str, *, for_update: bool = False) -> Experiment:
    exp = session.get(Experiment, experiment_id, with_for_update=for_update)
    if exp is None:
        raise NotFound("experiment_not_found", f"no experiment {experiment_id}")
    return exp


def list_experiments(
    session: Session, state: str | None = None, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page[Experiment]:
    query = select(Experiment)
    if state is not None:
        query = query.where(col(Experiment.state) == state)
    return select_page(
        session, query, [col(Experiment.created_at), col(Experiment.id)], "experiments", cursor, limit
    )


def _stop_arm(session: Session, exp: Experiment, arm: ExperimentArm, action: str, reason: str) -> None:
    """The arm's rollout stops and its devices go back to the control version."""
    if arm.state != RUNNING:
        return
    _abort(session, arm.rollout_id)
    control = next((a for a in _arms(session, exp) if a.name == exp.control), None)
    if control is not None and arm.name != exp.control and control.model_sha256 != arm.model_sha256:
        devices = session.exec(
            select(ExperimentDevice.device_id).where(
                ExperimentDevice.experiment_id == exp.id, ExperimentDevice.arm == arm.name
            )
        ).all()
        model = session.get(Model, control.model_id)
        if model is not None and devices:
            back = _start_rollout(
                session,
                model,
                exp.selector,
                sorted(devices),
                Policy.model_validate(exp.policy),
                f"experiment {exp.id}: arm {arm.name} stopped, back to the control {control.model_ref}",
            )
            arm.return_rollout_id = back.id
    arm.state, arm.reason, arm.stopped_at = STOPPED, reason, utcnow()
    session.add(arm)
    _decide(
        session,
        exp,
        action,
        f"arm {arm.name}: {reason}",
        {"arm": arm.name, "return_rollout": arm.return_rollout_id},
    )


def _abort(session: Session, rollout_id: str | None) -> None:
    if rollout_id is None:
        return
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is not None and rollout.state in RS.ACTIVE:
        operator_action(session, rollout, "abort")


def stop(
    session: Session, experiment_id: str, arm_name: str | None, reason: str, promote: bool = False
) -> Experiment:
    """Stop one arm (its devices back to the control) or the whole experiment (every arm but the
    control back to the control; with ``promote``, the proven winner rolled out instead).

    The assignment lock comes before the experiment's row and its rollouts' rows (a promotion
    gives devices out: ``store.assignment_lock_first``)."""
    assignment_lock_first(session)
    exp = find_experiment(session, experiment_id, for_update=True)
    if exp.state != RUNNING:
        if arm_name is None and not promote:
            return exp  # stopping a stopped experiment: a no-op
        raise Conflict("experiment_finished", f"experiment {exp.id} is {exp.state}")
    arms = _arms(session, exp)
    if arm_name is not None:
        arm = next((a for a in arms if a.name == arm_name), None)
        if arm is None:
            raise NotFound("arm_not_found", f"experiment {exp.id} has no arm {arm_name}")
        if arm.name == exp.control:
            raise Conflict(
                "control_arm", "the control arm is what the others go back to; stop the experiment"
            )
        _stop_arm(session, exp, arm, "stop_arm", f"operator: {reason}")
        exp.updated_at = utcnow()
        session.add(exp)
        return exp
    if promote:
        winner = exp.decision.get("winner")
        if not winner:
            raise Conflict("no_winner", f"experiment {exp.id} has no proven winner to promote")
        _finish(session, exp, COMPLETED, f"operator: promote {winner}: {reason}", promote=winner, strict=True)
        return exp
    for arm in arms:
        if arm.name != exp.control:
            _stop_arm(session, exp, arm, "stop_arm", f"experiment stopped: {reason}")
    _finish(session, exp, STOPPED, f"operator: {reason}")
    return exp


def _finish(
    session: Session,
    exp: Experiment,
    state: str,
    reason: str,
    promote: str | None = None,
    strict: bool = False,
) -> None:
    """End the experiment; ``promote``: roll that arm's version out to the selector (``strict``: a
    refused rollout is the caller's error, else it is recorded and the experiment ends without)."""
    arms = _arms(session, exp)
    for arm in arms:
        if arm.state == RUNNING:
            _abort(session, arm.rollout_id)
            arm.state = DONE  # its devices keep its version until a rollout (the promotion) moves them
            session.add(arm)
    exp.state, exp.reason, exp.updated_at = state, reason, utcnow()
    session.add(exp)
    session.flush()  # the devices are free before the promoting rollout looks for busy ones
    if promote is not None:
        winner = next(a for a in arms if a.name == promote)
        request = RolloutIn.model_validate(
            {**exp.policy, "model": winner.model_ref, "selector": exp.selector, "conflict": "skip"}
        )
        try:  # create_rollout refuses before it writes anything
            rollout = create_rollout(session, request)
        except DomainError as exc:
            if strict:
                raise
            # the leader's auto-promote: the experiment still ends, and says why nothing was rolled out
            _decide(session, exp, "promote_refused", f"{winner.model_ref}: {exc.code}: {exc.message}", {})
            _decide(session, exp, state, reason, {"winner": exp.decision.get("winner")})
            return
        exp.promoted_rollout_id = rollout.id
        session.add(exp)
        _decide(
            session, exp, "promote", f"{winner.model_ref} rolled out to the selector", {"rollout": rollout.id}
        )
    _decide(session, exp, state, reason, {"winner": exp.decision.get("winner")})


def evaluate(session: Session, exp: Experiment) -> core.Evaluation:
    """The current verdict; acts on it when the experiment runs: guardrail breaches stop their arms,
    a new winner is recorded, and with ``auto_promote`` rolled out."""
    arms = _arms(session, exp)
    running = [a.name for a in arms if a.state == RUNNING]
    spec = spec_of(exp)
    ev = core.evaluate(spec, arm_counts(session, exp), running)
    if exp.state != RUNNING:
        return ev
    for arm in arms:  # a rollout gate (error rate, latency, probation) may have sent an arm back first
        rollout = session.get(Rollout, arm.rollout_id) if arm.state == RUNNING and arm.rollout_id else None
        if rollout is not None and rollout.state in (RS.ROLLED_BACK, RS.ABORTED):
            last = session.exec(
                select(RolloutDecision)
                .where(RolloutDecision.rollout_id == rollout.id)
                .order_by(col(RolloutDecision.id).desc())
            ).first()
            why = f"its rollout {rollout.id} was {rollout.state}" + (f": {last.reason}" if last else "")
            _stop_arm(session, exp, arm, "rollout_stop", why)
    for b in ev.breaches:
        arm = next(a for a in arms if a.name == b.arm)
        if arm.state == RUNNING:
            _stop_arm(session, exp, arm, "guardrail_stop", f"guardrail {b.metric}: {b.reason}")
    if any(a.state == RUNNING and a.name != exp.control for a in arms) and ev.winner is not None:
        if exp.decision.get("winner") != ev.winner:
            figures = _decision_figures(ev, spec)
            exp.decision = figures
            exp.updated_at = utcnow()
            session.add(exp)
            _decide(session, exp, "winner", ev.reason, figures)
            if exp.auto_promote:
                _finish(session, exp, COMPLETED, f"auto-promote: {ev.reason}", promote=ev.winner)
    elif not any(a.state == RUNNING and a.name != exp.control for a in arms):
        exp.decision = {"winner": exp.control, "reason": "every other arm was stopped"}
        _finish(session, exp, COMPLETED, "every arm but the control was stopped")
    return ev


def _decision_figures(ev: core.Evaluation, spec: core.Spec) -> dict[str, Any]:
    primary = [c for c in ev.comparisons if c.metric == spec.metric and c.effect is not None]
    return {
        "winner": ev.winner,
        "reason": ev.reason,
        "metric": spec.metric,
        "alpha_per_arm": ev.alpha_per_arm,
        "effects": {
            c.arm: {
                "estimate": c.effect.estimate,
                "lower": c.effect.lower,
                "upper": c.effect.upper,
                "p_value": c.effect.p_value,
                "samples": c.samples,
                "control_samples": c.control_samples,
            }
            for c in primary
            if c.effect is not None
        },
    }


def tick(session: Session) -> int:
    """Evaluate every running experiment (the engine leader, every tick); returns how many."""
    ids = session.exec(select(Experiment.id).where(Experiment.state == RUNNING)).all()
    if ids:  # an evaluation may promote (give devices out): the lock before any row
        assignment_lock_first(session)
    for exp_id in ids:
        exp = session.get(Experiment, exp_id, with_for_update=True)
        if exp is not None and exp.state == RUNNING:
            evaluate(session, exp)
    return len(ids)


def status(session: Session, exp: Experiment, ev: core.Evaluation | None = None) -> ExperimentOut:
    counts = arm_counts(session, exp)
    if ev is None:  # every arm's figures, also of arms stopped or done (the verdict acts on running ones)
        ev = core.evaluate(spec_of(exp), counts, [a.name for a in _arms(session, exp)])
    spec = spec_of(exp)
    members = session.exec(select(ExperimentDevice).where(ExperimentDevice.experiment_id == exp.id)).all()
    serving: dict[str, str | None] = {}
    ids = [m.device_id for m in members]
    for chunk in range(0, len(ids), 5000):
        for did, sha in session.exec(
            select(Device.id, Device.running_sha256).where(col(Device.id).in_(ids[chunk : chunk + 5000]))
        ).all():
            serving[did] = sha
    arms_out = []
    for arm in _arms(session, exp):
        mine = [m for m in members if m.arm == arm.name]
        by_hw: dict[str, int] = {}
        for m in mine:
            by_hw[m.hardware_id] = by_hw.get(m.hardware_id, 0) + 1
        figures = core.arm_metrics(counts.get(arm.name, {}))
        effects = [
            EffectOut(
                metric=c.metric,
                better=c.better,
                verdict=c.verdict,
                estimate=c.effect.estimate if c.effect else None,
                lower=c.effect.lower if c.effect else None,
                upper=c.effect.upper if c.effect else None,
                p_value=c.effect.p_value if c.effect else None,
                samples=c.samples,
                control_samples=c.control_samples,
            )
            for c in ev.comparisons
            if c.arm == arm.name
        ]
        arms_out.append(
            ArmOut(
                name=arm.name,
                model=arm.model_ref,
                model_sha256=arm.model_sha256,
                weight=arm.weight,
                state=arm.state,
                reason=arm.reason,
                devices=len(mine),
                devices_by_hardware=dict(sorted(by_hw.items())),
                serving=sum(1 for m in mine if serving.get(m.device_id) == arm.model_sha256),
                rollout_id=arm.rollout_id,
                return_rollout_id=arm.return_rollout_id,
                metrics={k: MetricOut(**vars(f)) for k, f in figures.items()},
                effects=effects,
            )
        )
    decisions = session.exec(
        select(ExperimentDecision)
        .where(ExperimentDecision.experiment_id == exp.id)
        .order_by(col(ExperimentDecision.id))
    ).all()
    winner = exp.decision.get("winner") if exp.decision else None
    return ExperimentOut(
        id=exp.id,
        name=exp.name,
        state=exp.state,
        reason=exp.reason,
        selector=exp.selector,
        control=exp.control,
        metric=spec.metric,
        alpha=spec.alpha,
        alpha_per_arm=ev.alpha_per_arm,
        auto_promote=exp.auto_promote,
        winner=winner or (ev.winner if exp.state == RUNNING else None),
        verdict=ev.reason,
        promoted_rollout_id=exp.promoted_rollout_id,
        arms=arms_out,
        guardrails=list(exp.spec.get("guardrails", [])),
        decisions=[
            ExperimentDecisionOut(ts=d.ts, action=d.action, reason=d.reason, figures=d.figures)
            for d in decisions
        ],
        created_at=exp.created_at,
        updated_at=exp.updated_at,
    )


def experiment_rollouts(session: Session) -> set[str]:
    """Ids of every rollout an experiment started (arms and returns to the control)."""
    rows = session.exec(select(ExperimentArm.rollout_id, ExperimentArm.return_rollout_id)).all()
    return {r for pair in rows for r in pair if r is not None}


__all__ = [
    "arm_counts",
    "create_experiment",
    "evaluate",
    "experiment_rollouts",
    "find_experiment",
    "list_experiments",
    "reserved_devices",
    "spec_of",
    "status",
    "stop",
    "tick",
]

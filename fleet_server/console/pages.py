"""The console's routes under ``/ui``: thin handlers that read through the server's own services
(never HTTP to itself), build a view and render a template.

Every page needs a signed-in session and every POST that changes something passes ``acting``
first (``fleet_server.console.access``), so a viewer's click is refused here exactly as their
API call would be. Handlers are plain ``def`` (FastAPI runs them in its thread pool): they query the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlmodel import Session, col, func, select

from fleet_server import audit, devices, experiments, releases, slos
from fleet_server.auth import Principal, hash_token, principal_of
from fleet_server.console import experiment_view, obs_view, reads, rollout_view
from fleet_server.console.access import (
    Refused,
    SignedIn,
    User,
    acting,
    codec_of,
    ctx_of,
    same_origin,
)
from fleet_server.console.charts import line_chart
from fleet_server.console.session import COOKIE
from fleet_server.errors import DomainError
from fleet_server.lifecycle import OPERATOR_ACTIONS, RolloutState
from fleet_server.models import AuditEntry, Device, EventRow, Model, SloAlert, TelemetryBatchRow
from fleet_server.rollouts import find_rollout, list_rollouts, operator_action, rollout_status
from fleet_server.routes.guard import GuardedRoute
from fleet_server.selector_syntax import SYNTAX, SelectorError, parse_selector
from fleet_server.slo_store import load_samples, spec_of
from fleet_server.store import new_session
from fleet_server.telemetry_minutes import MINUTE, minute_of, minutes_since

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


class ConsoleRoute(GuardedRoute):
    """The API's route guard for the console's forms: a body is bounded while it streams in, at
    ``max_request_bytes`` like a JSON document (a form of a token or a CSRF field is tiny), never
    at the upload limit a form would otherwise get. Sign-in is checked by ``signed_in``."""

    raw_body = True


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=ConsoleRoute)
PAGE = 50  # rows per page of the console's tables
POLL_SECONDS = 2


@contextmanager
def db(request: Request) -> Iterator[Session]:
    with new_session(ctx_of(request).engine) as session:
        yield session


def render(request: Request, name: str, user: User | None, status: int = 200, **values: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"user": user, "now": datetime.now(UTC), **values}, status_code=status
    )


# --- sign in / out -----------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
def home() -> Response:
    return RedirectResponse("/ui/rollouts", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, why: str = "", next: str = "/ui/rollouts") -> HTMLResponse:
    return render(request, "login.html", None, message=why, next=_safe_next(next))


def _safe_next(target: str) -> str:
    """Only a path of the console itself: a sign-in link must not send the browser elsewhere."""
    return target if target.startswith("/ui/") and not target.startswith("/ui//") else "/ui/rollouts"


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    token: Annotated[str, Form(max_length=512)] = "",
    next: Annotated[str, Form()] = "/ui/rollouts",
) -> Response:
    if not same_origin(request):  # a sign-in posted from another site (login CSRF)
        request.state.error_code = "csrf_failed"
        raise Refused("sign in from the console's own page")
    token = token.strip()
    principal = principal_of(ctx_of(request), hash_token(token)) if token else None
    if principal is None or principal.role not in ("viewer", "operator", "admin"):
        request.state.principal = Principal("invalid-token", "")
        request.state.error_code = "invalid_token"
        why = (
            "enter an API token"
            if not token
            else "this token may post labels only, not use the console"
            if principal is not None
            else "unknown or revoked API token"
        )
        return render(request, "login.html", None, status=401, message=why, next=_safe_next(next))
    request.state.principal = principal
    codec = codec_of(request)
    value, _ = codec.issue(hash_token(token))
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        value,
        max_age=codec.max_age,
        path="/ui",
        httponly=True,
        samesite="strict",
        # https here, or behind a proxy that ends TLS for the public https address
        secure=request.url.scheme == "https" or ctx_of(request).settings.public_url.startswith("https://"),
    )
    return response


@router.post("/logout")
def logout(request: Request, user: SignedIn, csrf: Annotated[str | None, Form()] = None) -> Response:
    acting(request, user, csrf, role="viewer")
    response = RedirectResponse("/ui/login?why=signed+out", status_code=303)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


# --- rollouts ----------------------------------------------------------------------------------


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(
    request: Request,
    user: SignedIn,
    state: Annotated[RolloutState | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> HTMLResponse:
    with db(request) as session:
        try:
            page = list_rollouts(session, state, None, cursor=cursor, limit=PAGE)
        except DomainError as exc:
            return render(request, "error.html", user, status=400, message=exc.message)
        rows = reads.rollout_rows(session, page.items)
    return render(
        request,
        "rollouts.html",
        user,
        rows=rows,
        state=state.value if state else "",
        states=[s.value for s in RolloutState],
        next_url=_next_url("/ui/rollouts", {"state": state.value if state else None}, page.next),
    )


def _rollout_context(request: Request, rollout_id: str) -> dict[str, Any] | None:
    with db(request) as session:
        try:
            out = rollout_status(session, find_rollout(session, rollout_id))
        except DomainError:
            return None
    return {"r": rollout_view.build(out), "labels": rollout_view.ACTION_LABELS, "poll": POLL_SECONDS}


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(request: Request, rollout_id: str, user: SignedIn) -> HTMLResponse:
    values = _rollout_context(request, rollout_id)
    if values is None:
        return render(request, "error.html", user, status=404, message=f"no rollout {rollout_id}")
    return render(request, "rollout.html", user, **values)


@router.get("/rollouts/{rollout_id}/live", response_class=HTMLResponse)
def rollout_live(request: Request, rollout_id: str, user: SignedIn) -> HTMLResponse:
    """The part of the detail page that changes, for the page's poller to swap in."""
    values = _rollout_context(request, rollout_id)
    if values is None:
        return HTMLResponse("", status_code=404)
    return render(request, "rollout_live.html", user, **values)


@router.get("/rollouts/{rollout_id}/{action}", response_class=HTMLResponse)
def confirm_page(request: Request, rollout_id: str, action: str, user: SignedIn) -> HTMLResponse:
    """The confirmation step: what the action does, and the form that does it."""
    values = _rollout_context(request, rollout_id)
    if values is None or action not in OPERATOR_ACTIONS:
        return render(
            request, "error.html", user, status=404, message=f"no rollout {rollout_id} or action {action}"
        )
    if not user.can_act:
        raise Refused(
            f"{user.principal.actor} ({user.principal.role}) may not {action} rollouts: needs operator", user
        )
    return render(
        request,
        "confirm.html",
        user,
        action=action,
        consequence=rollout_view.ACTION_CONSEQUENCES[action],
        **values,
    )


@router.post("/rollouts/{rollout_id}/{action}", response_class=HTMLResponse)
def act(
    request: Request, rollout_id: str, action: str, user: SignedIn, csrf: Annotated[str | None, Form()] = None
) -> Response:
    acting(request, user, csrf)
    if action not in OPERATOR_ACTIONS:
        return render(request, "error.html", user, status=404, message=f"no action {action}")
    c = ctx_of(request)
    with db(request) as session:
        try:
            with c.lock:  # this process's ticker; other replicas' wait on the row lock
                operator_action(session, find_rollout(session, rollout_id, for_update=True), action)
                session.commit()
        except DomainError as exc:
            request.state.error_code = exc.code
            session.rollback()
            return render(request, "error.html", user, status=exc.status_code, message=exc.message)
    return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)


# --- experiments -------------------------------------------------------------------------------


@router.get("/experiments", response_class=HTMLResponse)
def experiments_page(
    request: Request, user: SignedIn, cursor: Annotated[str | None, Query(max_length=1024)] = None
) -> HTMLResponse:
    with db(request) as session:
        try:
            page = experiments.list_experiments(session, None, cursor=cursor, limit=PAGE)
        except DomainError as exc:
            return render(request, "error.html", user, status=400, message=exc.message)
        rows = [experiments.status(session, e) for e in page.items]
    return render(
        request, "experiments.html", user, rows=rows, next_url=_next_url("/ui/experiments", {}, page.next)
    )


@router.get("/experiments/{experiment_id}", response_class=HTMLResponse)
def experiment_page(request: Request, experiment_id: str, user: SignedIn) -> HTMLResponse:
    with db(request) as session:
        try:
            exp = experiments.status(session, experiments.find_experiment(session, experiment_id))
        except DomainError as exc:
            return render(request, "error.html", user, status=exc.status_code, message=exc.message)
    return render(request, "experiment.html", user, **experiment_view.context(exp))


# --- fleet -------------------------------------------------------------------------------------


@router.get("/fleet", response_class=HTMLResponse)
def fleet_page(
    request: Request,
    user: SignedIn,
    selector: Annotated[str, Query(max_length=4096)] = "",
    state: Annotated[str, Query(max_length=64)] = "",
    online: Annotated[str, Query(pattern="^(|true|false)$")] = "",
    model: Annotated[str, Query(max_length=256)] = "",
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> HTMLResponse:
    problem = ""
    rows: list[Device] = []
    next_cursor = None
    try:
        parsed = parse_selector(selector)
    except SelectorError as exc:
        parsed, problem = None, f"selector: {exc}"
    with db(request) as session:
        counts = reads.fleet_counts(session)
        if parsed is not None:
            where = devices.DeviceFilter(
                selector=parsed,
                state=state or None,
                online=None if not online else online == "true",
                model=model or None,
            )
            try:
                page = devices.list_devices(session, where, cursor=cursor, limit=PAGE)
                rows, next_cursor = page.items, page.next
            except DomainError as exc:
                problem = exc.message
    filters = {
        "selector": selector or None,
        "state": state or None,
        "online": online or None,
        "model": model or None,
    }
    return render(
        request,
        "fleet.html",
        user,
        counts=counts,
        rows=[reads.device_row(d) for d in rows],
        problem=problem,
        filters={k: v or "" for k, v in filters.items()},
        syntax=SYNTAX,
        next_url=_next_url("/ui/fleet", filters, next_cursor),
        status=400 if problem else 200,
    )


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(request: Request, device_id: str, user: SignedIn) -> HTMLResponse:
    with db(request) as session:
        device = session.get(Device, device_id)
        if device is None:
            return render(request, "error.html", user, status=404, message=f"no device {device_id}")
        events = session.exec(
            select(EventRow)
            .where(col(EventRow.device_id) == device_id)
            .order_by(col(EventRow.id).desc())
            .limit(50)
        ).all()
        batches = session.exec(
            select(TelemetryBatchRow)
            .where(col(TelemetryBatchRow.device_id) == device_id)
            .order_by(col(TelemetryBatchRow.id).desc())
            .limit(20)
        ).all()
        names = reads.model_names(session, reads.shas_in(device, batches))
    return render(
        request,
        "device.html",
        user,
        d=reads.device_row(device),
        slots=reads.slots(device, names),
        events=list(events),
        telemetry=[reads.telemetry_row(b, names) for b in batches],
    )


# --- models ------------------------------------------------------------------------------------


@router.get("/models", response_class=HTMLResponse)
def models_page(
    request: Request, user: SignedIn, cursor: Annotated[str | None, Query(max_length=1024)] = None
) -> HTMLResponse:
    c = ctx_of(request)
    targets = reads.delivery_targets(c)
    with db(request) as session:
        try:
            page = releases.list_models(session, cursor=cursor, limit=PAGE)
        except DomainError as exc:
            return render(request, "error.html", user, status=400, message=exc.message)
        running = reads.running_counts(session)
    rows = [reads.model_row(m, targets, running.get(m.sha256, 0)) for m in page.items]
    return render(
        request,
        "models.html",
        user,
        rows=rows,
        tuf=targets is not None,
        next_url=_next_url("/ui/models", {}, page.next),
    )


@router.get("/models/{name}/{version}", response_class=HTMLResponse)
def model_page(request: Request, name: str, version: str, user: SignedIn) -> HTMLResponse:
    c = ctx_of(request)
    with db(request) as session:
        try:
            m = releases.get_model(session, name, version)
        except DomainError as exc:
            return render(request, "error.html", user, status=404, message=exc.message)
        running = reads.running_counts(session, m.sha256).get(m.sha256, 0)
    targets = reads.delivery_targets(c)
    report = Path(m.storage_path) / "report.html"
    return render(
        request,
        "model.html",
        user,
        m=reads.model_row(m, targets, running),
        detail=reads.model_detail(m),
        has_report=report.is_file(),
        tuf=targets is not None,
    )


@router.get("/models/{name}/{version}/report", response_class=HTMLResponse)
def model_report(request: Request, name: str, version: str, user: SignedIn) -> Response:
    """The compiler's HTML report shipped in the bundle, served as a file (sandboxed: no scripts)."""
    with db(request) as session:
        try:
            m = releases.get_model(session, name, version)
        except DomainError as exc:
            return render(request, "error.html", user, status=404, message=exc.message)
    report = Path(m.storage_path) / "report.html"
    if not report.is_file():
        return render(request, "error.html", user, status=404, message="this bundle has no HTML report")
    return HTMLResponse(report.read_text(errors="replace"), headers={"Content-Security-Policy": "sandbox"})


# --- observability -----------------------------------------------------------------------------

WINDOWS = {"1h": 3600, "6h": 6 * 3600, "24h": 86400}


@router.get("/observability", response_class=HTMLResponse)
def observability_page(
    request: Request,
    user: SignedIn,
    model: Annotated[str, Query(max_length=256)] = "",
    window: Annotated[str, Query(pattern="^(1h|6h|24h)$")] = "6h",
) -> HTMLResponse:
    now = datetime.now(UTC)
    start = now - timedelta(seconds=WINDOWS[window])
    with db(request) as session:
        models = session.exec(select(Model).order_by(col(Model.name), col(Model.id))).all()
        chosen = next((m for m in models if f"{m.name}:{m.version}" == model), None)
        if chosen is None and models and not model:
            chosen = models[-1]
        charts: list[str] = []
        slo_rows: list[Any] = []
        alerts: list[SloAlert] = []
        if chosen is not None:
            rows = minutes_since(session, chosen.sha256, start)
            series = obs_view.charts(
                obs_view.bucketed(rows, chosen.sha256, minute_of(start), now.timestamp(), 24, MINUTE)
            )
            charts = [line_chart(name, s, obs_view.UNITS[name]) for name, s in series.items()]
            times = [start.timestamp() + (i + 1) * WINDOWS[window] / 24 for i in range(24)]
            budgets = []
            for row in reads.slos_of(session, chosen.name):
                status, count = slos.status_of(session, row, now)
                slo_rows.append((row, slos.status_out(status, count)))
                budgets += obs_view.budget_series(spec_of(row), load_samples(session, row.name), times)
            if budgets:
                charts.append(line_chart("SLO error budget left", budgets, "%", floor_zero=False))
            alerts = list(
                session.exec(
                    select(SloAlert).where(
                        col(SloAlert.model) == chosen.name, col(SloAlert.state) == "firing"
                    )
                ).all()
            )
    return render(
        request,
        "observability.html",
        user,
        models=[f"{m.name}:{m.version}" for m in models],
        chosen=f"{chosen.name}:{chosen.version}" if chosen else "",
        window=window,
        windows=list(WINDOWS),
        charts=charts,
        slo_rows=slo_rows,
        alerts=alerts,
    )


# --- audit -------------------------------------------------------------------------------------


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    user: SignedIn,
    actor: Annotated[str, Query(max_length=160)] = "",
    path: Annotated[str, Query(max_length=512)] = "",
    result: Annotated[str, Query(max_length=64)] = "",
    before: Annotated[int | None, Query(ge=1)] = None,
) -> HTMLResponse:
    where = audit.AuditFilter(actor=actor or None, path=path or None, result=result or None)
    with db(request) as session:
        rows, older = reads.audit_newest_first(session, where, before, PAGE)
        total = session.exec(select(func.count()).select_from(AuditEntry)).one()
    filters = {"actor": actor or None, "path": path or None, "result": result or None}
    query = {k: v for k, v in filters.items() if v}
    return render(
        request,
        "audit.html",
        user,
        rows=rows,
        total=total,
        filters={k: v or "" for k, v in filters.items()},
        next_url=None if older is None else f"/ui/audit?{urlencode({**query, 'before': older})}",
    )


def _next_url(base: str, filters: dict[str, str | None], cursor: str | None) -> str | None:
    if cursor is None:
        return None
    query = {k: v for k, v in filters.items() if v}
    query["cursor"] = cursor
    return f"{base}?{urlencode(query)}"


__all__ = ["render", "router"]

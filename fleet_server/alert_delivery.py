"""Alert notifications delivered to Alertmanager's v2 API and to plain webhooks, with retries and a log.

Each notification becomes one ``AlertDelivery`` row per receiver in the same
transaction as the alert change (an outbox), so a crash between deciding and
sending loses nothing. The sender tries due rows, backing off exponentially up
to ``MAX_BACKOFF_S``, and gives up after ``alert_max_attempts``; every row keeps
its attempts and last error: that is the delivery log.

The Alertmanager body is rendered when sent, not when queued: a firing alert is
sent valid until four re-send intervals ahead (as Prometheus does), and
re-sent while it fires, so Alertmanager resolves it by itself if this server
stops; a resolved one carries its resolution time as ``endsAt``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet_server.models import AlertDelivery, SloAlert
from fleet_server.settings import ServerSettings
from fleet_server.slo.alerts import Alert, AlertState, Notification
from fleet_server.slo_store import at
from fleet_server.store import new_session

log = logging.getLogger(__name__)

ALERTNAME = "EdgefleetSLOBurn"
MAX_BACKOFF_S = 300.0
FIRST_BACKOFF_S = 2.0
BATCH = 100  # deliveries tried per run at most


def receivers(settings: ServerSettings) -> list[str]:
    return [f"alertmanager:{u.rstrip('/')}" for u in settings.alertmanager_urls] + [
        f"webhook:{u}" for u in settings.alert_webhook_urls
    ]


def alert_document(a: Alert) -> dict[str, Any]:
    """What a receiver needs of an alert, kept on the delivery row."""
    return {
        "id": a.key.id,
        "model": a.key.model,
        "hardware_id": a.key.hardware_id,
        "severity": str(a.key.severity),
        "state": str(a.state),
        "fired_at": at(a.fired_at).isoformat() if a.fired_at is not None else None,
        "resolved_at": at(a.resolved_at).isoformat() if a.resolved_at is not None else None,
        "causes": list(a.causes),
    }


def enqueue(
    session: Session, notifications: Sequence[Notification], targets: Sequence[str], now: datetime
) -> None:
    for n in notifications:
        for receiver in targets:
            session.add(
                AlertDelivery(
                    alert_id=n.alert.key.id,
                    status=n.status,
                    receiver=receiver,
                    payload=alert_document(n.alert),
                    created_at=now,
                    next_attempt_at=now,
                )
            )


def alertmanager_alert(doc: dict[str, Any], status: str, now: datetime, resend_s: float) -> dict[str, Any]:
    """One alert in Alertmanager's v2 ``postableAlert`` form."""
    labels = {
        "alertname": ALERTNAME,
        "model": doc["model"],
        "cohort": doc["hardware_id"] or "all",
        "severity": doc["severity"],
    }
    ends = doc["resolved_at"] if status == "resolved" else (now + timedelta(seconds=4 * resend_s)).isoformat()
    return {
        "labels": labels,
        "annotations": {
            "summary": f"{doc['model']} ({labels['cohort']}) is burning its error budget",
            "causes": "; ".join(doc["causes"]),
        },
        "startsAt": doc["fired_at"] or now.isoformat(),
        "endsAt": ends,
    }


def webhook_body(doc: dict[str, Any], status: str) -> dict[str, Any]:
    return {"version": "1", "receiver": "edgefleet", "status": status, "alert": doc}


def send(
    http: httpx.Client, receiver: str, doc: dict[str, Any], status: str, now: datetime, resend_s: float
) -> None:
    """POST one notification; raises on any failure (no answer, or a non-2xx one)."""
    kind, url = receiver.split(":", 1)
    if kind == "alertmanager":
        r = http.post(f"{url}/api/v2/alerts", json=[alertmanager_alert(doc, status, now, resend_s)])
    else:
        r = http.post(url, json=webhook_body(doc, status))
    r.raise_for_status()


def backoff(attempts: int) -> float:
    return min(FIRST_BACKOFF_S * 2 ** (attempts - 1), MAX_BACKOFF_S)


def deliver_due(engine: Engine, http: httpx.Client, settings: ServerSettings, now: datetime) -> int:
    """Try every due delivery once; returns how many went through."""
    with new_session(engine) as session:
        due = session.exec(
            select(AlertDelivery)
            .where(
                col(AlertDelivery.delivered_at).is_(None),
                col(AlertDelivery.gave_up).is_(False),
                col(AlertDelivery.next_attempt_at) <= now,
            )
            .order_by(col(AlertDelivery.id))
            .limit(BATCH)
        ).all()
        ok = 0
        for d in due:
            d.attempts += 1
            try:
                send(http, d.receiver, d.payload, d.status, now, settings.alertmanager_resend_seconds)
            except (httpx.HTTPError, ValueError) as exc:
                d.last_error = f"{type(exc).__name__}: {exc}"[:512]
                d.gave_up = d.attempts >= settings.alert_max_attempts
                d.next_attempt_at = now + timedelta(seconds=backoff(d.attempts))
                log.warning(
                    "alert %s %s to %s failed (try %d): %s", d.alert_id, d.status, d.receiver, d.attempts, exc
                )
            else:
                d.delivered_at, d.last_error = now, ""
                ok += 1
            session.add(d)
        session.commit()
    return ok


def resend_firing(engine: Engine, http: httpx.Client, settings: ServerSettings, now: datetime) -> None:
    """Send every notified, firing alert to each Alertmanager again, so it stays active there."""
    if not settings.alertmanager_urls:
        return
    with new_session(engine) as session:
        rows = session.exec(
            select(SloAlert).where(SloAlert.state == AlertState.FIRING, col(SloAlert.notified).is_(True))
        ).all()
        docs = [
            {
                "id": r.id,
                "model": r.model,
                "hardware_id": r.hardware_id,
                "severity": r.severity,
                "fired_at": r.fired_at.isoformat() if r.fired_at else None,
                "resolved_at": None,
                "causes": r.causes,
            }
            for r in rows
        ]
    if not docs:
        return
    for url in settings.alertmanager_urls:
        body = [alertmanager_alert(d, "firing", now, settings.alertmanager_resend_seconds) for d in docs]
        try:
            http.post(f"{url.rstrip('/')}/api/v2/alerts", json=body).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("re-sending %d firing alert(s) to %s failed: %s", len(body), url, exc)

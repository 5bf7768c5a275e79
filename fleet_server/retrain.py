"""The retrain webhook: tell a training pipeline when a model in the field needs new data.

``ServerSettings.retrain_webhook_url`` with a threshold on accuracy (``retrain_min_accuracy``,
judged once ``retrain_min_labels`` labels are in) and/or on output drift
(``retrain_max_psi``: the PSI of the model's output histogram against the model its latest
rollout replaced, once both have ``retrain_min_samples`` outputs). The leader replica checks
every ``retrain_check_seconds``; when a model crosses a threshold it POSTs::

    {"event": "retrain", "model": "digits:2", "sha256": ..., "reason": "accuracy" | "drift",
     "figures": {...}, "thresholds": {...},
     "window": {"since": ..., "until": ...},
     "dataset": {"model": "digits:2", "since": ..., "until": ..., "labeled": true,
                 "path": "/api/v1/captures?model=digits%3A2&since=...&until=...&labeled=true"}}

``dataset`` is the query ``edgefleet data export`` runs: what to retrain on. A crossing fires
once; the model must come back within the threshold before the same reason fires again
(:func:`decide`, pure). Delivery retries with exponential backoff and full jitter up to
``retrain_webhook_attempts`` times (any 2xx ends it); the state is kept in memory, so a
restarted leader fires again for a model still across (at least once, never silently lost).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet_server.gates import add_counts, psi
from fleet_server.models import Model, ModelAggregate, Rollout, RolloutDevice
from fleet_server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    min_accuracy: float | None = None
    max_psi: float | None = None
    min_labels: int = 200
    min_samples: int = 1000

    @classmethod
    def of(cls, s: ServerSettings) -> Thresholds:
        return cls(s.retrain_min_accuracy, s.retrain_max_psi, s.retrain_min_labels, s.retrain_min_samples)


@dataclass(frozen=True)
class Figures:
    """What the devices counted for one model (all devices, all time)."""

    model: str  # name:version
    sha256: str
    labels: int = 0
    correct: int = 0
    psi: float | None = None  # None: no baseline, or too few outputs on either side
    samples: int = 0


@dataclass(frozen=True)
class Fire:
    model: str
    sha256: str
    reason: str  # "accuracy" or "drift"
    figures: dict[str, Any]


def crossed(f: Figures, t: Thresholds) -> dict[str, dict[str, Any]]:
    """The thresholds ``f`` is across now, with the figures that say so (pure)."""
    out: dict[str, dict[str, Any]] = {}
    if t.min_accuracy is not None and f.labels >= max(t.min_labels, 1):
        accuracy = f.correct / f.labels
        if accuracy < t.min_accuracy:
            out["accuracy"] = {"accuracy": accuracy, "labels": f.labels, "correct": f.correct}
    if t.max_psi is not None and f.psi is not None and f.psi > t.max_psi:
        out["drift"] = {"psi": f.psi, "samples": f.samples}
    return out


def decide(
    figures: Iterable[Figures], t: Thresholds, fired: frozenset[tuple[str, str]]
) -> tuple[list[Fire], frozenset[tuple[str, str]]]:
    """The webhooks to send now and the (sha256, reason) pairs across afterwards (pure): a pair
    fires when it crosses, not again while it stays across, and again after it came back."""
    fires: list[Fire] = []
    across: set[tuple[str, str]] = set()
    for f in figures:
        for reason, figs in crossed(f, t).items():
            across.add((f.sha256, reason))
            if (f.sha256, reason) not in fired:
                fires.append(Fire(f.model, f.sha256, reason, figs))
    return fires, frozenset(across)


def payload(fire: Fire, t: Thresholds, since: datetime, until: datetime) -> dict[str, Any]:
    """The webhook body: which model, why, and the dataset query to retrain on."""
    window = {"since": since.isoformat(), "until": until.isoformat()}
    query = {"model": fire.model, **window, "labeled": "true"}
    return {
        "event": "retrain",
        "model": fire.model,
        "sha256": fire.sha256,
        "reason": fire.reason,
        "figures": fire.figures,
        "thresholds": {"min_accuracy": t.min_accuracy, "max_psi": t.max_psi, "min_labels": t.min_labels},
        "window": window,
        "dataset": {
            "model": fire.model,
            **window,
            "labeled": True,
            "path": "/api/v1/captures?" + urlencode(query),
        },
    }


def read_figures(engine: Engine, min_samples: int) -> list[Figures]:
    """Per model the server holds: label totals, and output PSI against the model its latest
    rollout replaced (the most common previous model of that rollout's devices)."""
    with Session(engine) as session:
        models = {m.sha256: f"{m.name}:{m.version}" for m in session.exec(select(Model)).all()}
        sums: dict[str, list[Any]] = {}
        for agg in session.exec(select(ModelAggregate)).all():
            s = sums.setdefault(agg.sha256, [0, 0, ()])
            s[0] += agg.labels
            s[1] += agg.labels_correct
            s[2] = add_counts(s[2], agg.output_hist)
        baselines: dict[str, str] = {}
        for sha in models:
            latest = session.exec(
                select(Rollout.id).where(Rollout.model_sha256 == sha).order_by(col(Rollout.created_at).desc())
            ).first()
            if latest is None:
                continue
            previous = session.exec(
                select(RolloutDevice.previous_sha256).where(RolloutDevice.rollout_id == latest)
            ).all()
            common = Counter(p for p in previous if p and p != sha).most_common(1)
            if common:
                baselines[sha] = common[0][0]
    out = []
    for sha, name in models.items():
        labels, correct, hist = sums.get(sha, [0, 0, ()])
        value, samples = None, sum(hist)
        base = sums.get(baselines.get(sha, ""))
        if base is not None and samples >= min_samples and sum(base[2]) >= min_samples:
            value = psi(hist, base[2])
        out.append(Figures(name, sha, labels, correct, value, samples))
    return out


def deliver(
    url: str,
    body: dict[str, Any],
    attempts: int,
    *,
    base_s: float = 1.0,
    cap_s: float = 60.0,
    stop: threading.Event | None = None,
    timeout_s: float = 10.0,
) -> bool:
    """POST ``body`` until a 2xx, at most ``attempts`` times, backing off with full jitter."""
    for attempt in range(attempts):
        try:
            r = httpx.post(url, json=body, timeout=timeout_s)
            if 200 <= r.status_code < 300:
                return True
            log.warning("retrain webhook %s answered %s (attempt %d)", url, r.status_code, attempt + 1)
        except httpx.HTTPError as exc:
            log.warning("retrain webhook %s failed (attempt %d): %s", url, attempt + 1, exc)
        if attempt + 1 < attempts:
            delay = random.uniform(0.0, min(cap_s, base_s * 2**attempt))  # jitter, not crypto
            if stop is not None and stop.wait(delay):
                return False
            if stop is None:
                time.sleep(delay)
    log.error("retrain webhook %s: gave up after %d attempts (%s)", url, attempts, body.get("model"))
    return False


class RetrainWatcher:
    """The leader's check loop and its deliveries (each on a thread of its own, so a slow receiver
    never delays the next check)."""

    def __init__(self, settings: ServerSettings, engine: Engine, is_leader: Callable[[], bool]) -> None:
        self.settings = settings
        self.engine = engine
        self.is_leader = is_leader
        self.thresholds = Thresholds.of(settings)
        self.fired: frozenset[tuple[str, str]] = frozenset()
        self.sent: list[dict[str, Any]] = []  # bodies delivered (for tests and logs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.settings.retrain_webhook_url:
            return
        self._thread = threading.Thread(target=self._run, name="retrain-webhook", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def check(self) -> list[Fire]:
        """One pass: decide, and start the deliveries of what fired."""
        figures = read_figures(self.engine, self.thresholds.min_samples)
        fires, self.fired = decide(figures, self.thresholds, self.fired)
        until = datetime.now(UTC)
        since = until - timedelta(seconds=self.settings.retrain_window_seconds)
        for fire in fires:
            body = payload(fire, self.thresholds, since, until)
            log.warning(
                "retrain webhook: %s crossed its %s threshold: %s", fire.model, fire.reason, fire.figures
            )
            threading.Thread(target=self._send, args=(body,), name="retrain-delivery", daemon=True).start()
        return fires

    def _send(self, body: dict[str, Any]) -> None:
        url = self.settings.retrain_webhook_url
        if url and deliver(url, body, self.settings.retrain_webhook_attempts, stop=self._stop):
            self.sent.append(body)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.retrain_check_seconds):
            if not self.is_leader():
                continue
            try:
                self.check()
            except Exception:
                log.exception("retrain check failed")


__all__ = ["Figures", "Fire", "RetrainWatcher", "Thresholds", "crossed", "decide", "deliver", "payload"]

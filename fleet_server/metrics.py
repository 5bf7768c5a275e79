"""``/metrics``: the fleet, rollouts, ingest, SLOs and alerts in Prometheus' text format.

No series carries a device: devices are counted by deployment state and online
status, models by name, version and hardware cohort (at most ``MAX_MODEL_GROUPS``
groups, the rest summed under version ``other``), latency on a coarse fixed set
of buckets. So the number of series does not grow with the fleet.

A scrape reads only a few grouped counts from the database; the per-model
totals and the SLO figures come from the SLO loop's last pass (``SloRunner``),
so a scrape at 10,000 devices stays cheap. Only the leader runs that loop, so
only the leader exports them: summed over replicas, nothing counts twice. One registry per app,
not the process-global one: tests run several servers in one process.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select

from device_agent.protocol import INPUT_BUCKETS, INPUT_CHECKS, LATENCY_BOUNDS_US
from fleet_server.debug_series import (
    CLASS_KINDS,
    DEBUG_BUCKET_INPUTS,
    DEBUG_CLASSES,
    DEBUG_GROUPS,
    DEBUG_INPUTS,
    Detail,
    bucket_series,
    class_series,
    input_series,
)
from fleet_server.lifecycle import RolloutState
from fleet_server.models import Device, Rollout, SloAlert
from fleet_server.slo.alerts import AlertState
from fleet_server.slo.series import Totals, events, window_events
from fleet_server.slo.spec import Severity, format_duration
from fleet_server.slo_store import Cohort, VersionName
from fleet_server.store import new_session

if TYPE_CHECKING:
    from fleet_server.context import ServerContext
    from fleet_server.slo_runner import Evaluation

MAX_MODEL_GROUPS = 40  # x 26 series each (7 counters, 4 input checks, 15 histogram series)
# seconds; each a bound the device histogram also has, or the sum of the buckets under it
LATENCY_LE_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INGEST_KINDS = (
    "telemetry_batches",
    "duplicate_batches",
    "events",
    "reported",
    "status",
    "malformed_messages",
    "unregistered_messages",
    "dropped_messages",
)
DEVICE_STATES_NONE = "none"


def coarse_latency(buckets: tuple[int, ...]) -> list[tuple[str, float]]:
    """Cumulative counts at ``LATENCY_LE_S`` and +Inf from the device histogram (a device bucket
    counts under the first coarse bound at or above its own upper bound)."""
    cuts = [bisect.bisect_right(LATENCY_BOUNDS_US, le * 1e6) for le in LATENCY_LE_S]
    out = [(f"{le:g}", float(sum(buckets[:cut]))) for le, cut in zip(LATENCY_LE_S, cuts, strict=True)]
    out.append(("+Inf", float(sum(buckets))))
    return out


def model_groups(
    cohorts: Mapping[Cohort, Totals], names: Mapping[str, VersionName]
) -> dict[tuple[str, str, str], Totals]:
    """Totals per (model, version, cohort): the busiest ``MAX_MODEL_GROUPS``, the rest summed as one
    group (other, other, other), so a fleet with many versions or cohorts stays within bounds."""
    groups: dict[tuple[str, str, str], Totals] = {}
    for (sha, hw), t in cohorts.items():
        named = names.get(sha)
        key = (named.name, named.version, hw) if named else ("unknown", "unknown", hw)
        groups[key] = groups[key] + t if key in groups else t
    ranked = sorted(groups.items(), key=lambda kv: -kv[1].inferences)
    out = dict(ranked[:MAX_MODEL_GROUPS])
    for _, t in ranked[MAX_MODEL_GROUPS:]:
        key = ("other", "other", "other")
        out[key] = out[key] + t if key in out else t
    return out


def debug_groups(
    cohorts: Mapping[Cohort, Totals], details: Mapping[Cohort, Detail], names: Mapping[str, VersionName]
) -> dict[tuple[str, str, str], Detail]:
    """The per-input and per-class figures of the ``DEBUG_GROUPS`` busiest (model, version, cohort)
    groups (named as ``model_groups`` names them)."""
    inferences: dict[tuple[str, str, str], int] = {}
    pooled: dict[tuple[str, str, str], Detail] = {}
    for (sha, hw), detail in details.items():
        named = names.get(sha)
        key = (named.name, named.version, hw) if named else ("unknown", "unknown", hw)
        t = cohorts.get((sha, hw))
        inferences[key] = inferences.get(key, 0) + (t.inferences if t else 0)
        pooled[key] = pooled[key] + detail if key in pooled else detail
    busiest = sorted(pooled, key=lambda k: (-inferences[k], k))[:DEBUG_GROUPS]
    return {k: pooled[k] for k in busiest}


class FleetCollector(Collector):
    def __init__(self, context: ServerContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        c = self.context
        yield from self._fleet()
        ingest = CounterMetricFamily(
            "edgefleet_ingest_messages", "MQTT messages this replica took in", labels=["kind"]
        )
        snap = c.counters.snapshot()
        for kind in INGEST_KINDS:
            ingest.add_metric([kind], float(snap.get(kind, 0)))
        yield ingest
        bridge = c.bridge
        yield GaugeMetricFamily(
            "edgefleet_ingest_backlog_messages",
            "messages received, not stored yet",
            value=bridge.backlog if bridge else 0,
        )
        yield GaugeMetricFamily(
            "edgefleet_ingest_lag_seconds",
            "how long a message reaching the broker now waits before it is stored: the broker's queue"
            " for the ingest workers (measured with probes through it) and this replica's own",
            value=bridge.ingest_lag if bridge else 0.0,
        )
        streams = GaugeMetricFamily(
            "edgefleet_ingest_stream_lag_seconds",
            "edgefleet_ingest_lag_seconds per stream (events and telemetry have ingest workers and"
            " broker queues of their own; none with ingest_workers=0)",
            labels=["stream"],
        )
        for stream, lag in (bridge.stream_lag() if bridge is not None else {}).items():
            streams.add_metric([stream], lag)
        yield streams
        yield GaugeMetricFamily(
            "edgefleet_mqtt_connected",
            "1 when this replica and its ingest workers are connected to the broker",
            value=1.0 if bridge is not None and bridge.connected else 0.0,
        )
        shards = GaugeMetricFamily(
            "edgefleet_mqtt_shard_connected",
            "1 when this replica's main client is connected to the broker shard (one: 'default')",
            labels=["shard"],
        )
        for name, up in (bridge.shard_connected() if bridge is not None else {}).items():
            shards.add_metric([name], 1.0 if up else 0.0)
        yield shards
        yield GaugeMetricFamily(
            "edgefleet_leader",
            "1 when this replica drives the rollout engine and the SLO loop",
            value=1.0 if c.ticker is not None and c.ticker.is_leader else 0.0,
        )
        yield from self._models()
        yield from self._slos()

    def _fleet(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily("edgefleet_devices", "registered devices", labels=["state", "online"])
        rollouts = GaugeMetricFamily("edgefleet_rollouts", "rollouts", labels=["state"])
        alerts = GaugeMetricFamily("edgefleet_slo_alerts", "SLO alerts", labels=["severity", "state"])
        with new_session(self.context.engine) as session:
            for state, online, n in session.exec(
                select(Device.deployment_state, Device.online, func.count()).group_by(
                    col(Device.deployment_state), col(Device.online)
                )
            ):
                devices.add_metric([state or DEVICE_STATES_NONE, "true" if online else "false"], n)
            counted = dict(
                session.exec(select(Rollout.state, func.count()).group_by(col(Rollout.state))).all()
            )
            for state in RolloutState:
                rollouts.add_metric([str(state)], counted.get(state, 0))
            by_state = {
                (sev, st): n
                for sev, st, n in session.exec(
                    select(SloAlert.severity, SloAlert.state, func.count()).group_by(
                        col(SloAlert.severity), col(SloAlert.state)
                    )
                )
            }
        for severity in Severity:
            for state in (AlertState.PENDING, AlertState.FIRING, AlertState.RESOLVED):
                alerts.add_metric([str(severity), str(state)], by_state.get((str(severity), str(state)), 0))
        yield devices
        yield rollouts
        yield alerts

    def _last(self) -> Evaluation | None:
        slo, ticker = self.context.slo, self.context.ticker
        if slo is None or (ticker is not None and not ticker.is_leader):
            return None
        return slo.evaluator.last

    def _models(self) -> Iterator[Metric]:
        last = self._last()
        labels = ["model", "version", "cohort"]
        fams = {
            "inferences": CounterMetricFamily(
                "edgefleet_model_inferences", "inferences devices counted", labels=labels
            ),
            "errors": CounterMetricFamily("edgefleet_model_errors", "inferences that failed", labels=labels),
            "requests": CounterMetricFamily("edgefleet_model_requests", "local API requests", labels=labels),
            "request_errors": CounterMetricFamily(
                "edgefleet_model_request_errors", "local API requests that got no prediction", labels=labels
            ),
            "labels": CounterMetricFamily(
                "edgefleet_model_labels",
                "predictions labelled with the truth: on devices, and posted to the server for a capture",
                labels=labels,
            ),
            "labels_correct": CounterMetricFamily(
                "edgefleet_model_labels_correct", "labelled predictions that were right", labels=labels
            ),
        }
        checks = CounterMetricFamily(
            "edgefleet_model_input_checks",
            "inputs checked on devices (sampled), and of them with NaN, a missing feature or a value outside"
            " the calibration range",
            labels=[*labels, "result"],
        )
        cpu = CounterMetricFamily(
            "edgefleet_model_cpu_seconds", "agent CPU time spent on the model's inferences", labels=labels
        )
        latency = HistogramMetricFamily(
            "edgefleet_model_latency_seconds", "inference latency as devices measured it", labels=labels
        )
        if last is not None:
            for (name, version, hw), t in sorted(model_groups(last.cohorts, last.names).items()):
                key = [name, version, hw]
                for field, fam in fams.items():
                    fam.add_metric(key, float(getattr(t, field)))
                cpu.add_metric(key, t.cpu_ms / 1000.0)
                for result, n in zip(INPUT_CHECKS, t.input_checks, strict=False):
                    checks.add_metric([*key, result], float(n))
                latency.add_metric(key, coarse_latency(t.latency), sum_value=float("nan"))
        yield from fams.values()
        yield cpu
        yield checks
        yield latency
        yield from self._details(last)

    def _details(self, last: Evaluation | None) -> Iterator[Metric]:
        """Per input and per class, for the busiest groups only (``fleet_server.debug_series``)."""
        labels = ["model", "version", "cohort"]
        by_input = CounterMetricFamily(
            "edgefleet_model_input_checks_by_input",
            f"inputs checked on devices, per input tensor, and of them with NaN, a missing feature or a"
            f" value outside the calibration range (the {DEBUG_GROUPS} busiest groups; {DEBUG_INPUTS}"
            f" inputs each, the rest as other)",
            labels=[*labels, "input", "result"],
        )
        by_bucket = CounterMetricFamily(
            "edgefleet_model_input_bucket",
            f"input values sampled on devices, per input tensor and bucket of its calibration range:"
            f" below min, ten equal bins over [min, max] (as a share of the range), above max (the"
            f" {DEBUG_GROUPS} busiest groups; their {DEBUG_BUCKET_INPUTS} inputs with the most checks)",
            labels=[*labels, "input", "bucket"],
        )
        by_class = CounterMetricFamily(
            "edgefleet_model_class",
            f"per top-1 class: predictions, labelled predictions whose truth it is, labelled predictions"
            f" of it, and right ones (the {DEBUG_GROUPS} busiest groups; {DEBUG_CLASSES} classes each,"
            f" the rest as other)",
            labels=[*labels, "class", "kind"],
        )
        if last is not None:
            for key, detail in debug_groups(last.cohorts, last.details, last.names).items():
                for name, counts in input_series(detail).items():
                    for result, n in zip(INPUT_CHECKS, counts, strict=True):
                        by_input.add_metric([*key, name, result], float(n))
                for name, counts in bucket_series(detail).items():
                    for bucket, n in zip(INPUT_BUCKETS, counts, strict=True):
                        by_bucket.add_metric([*key, name, bucket], float(n))
                for c, row in class_series(detail).items():
                    for kind in CLASS_KINDS:
                        by_class.add_metric([*key, c, kind], float(row[kind]))
        yield by_input
        yield by_bucket
        yield by_class

    def _slos(self) -> Iterator[Metric]:
        last = self._last()
        labels = ["slo", "model", "cohort", "sli"]
        total = CounterMetricFamily("edgefleet_slo_events", "events an SLO objective counts", labels=labels)
        bad = CounterMetricFamily("edgefleet_slo_bad_events", "of which bad", labels=labels)
        target = GaugeMetricFamily(
            "edgefleet_slo_target", "the objective's target share of good events", labels=labels
        )
        min_events = GaugeMetricFamily(
            "edgefleet_slo_min_events",
            "events a rule's short window must hold before it may breach (a rule may ask more: the"
            " default fast page tier asks 300)",
            labels=labels,
        )
        remaining = GaugeMetricFamily(
            "edgefleet_slo_error_budget_remaining",
            "share of the window's budget left (below 0: overspent)",
            labels=labels,
        )
        burn = GaugeMetricFamily(
            "edgefleet_slo_burn_rate",
            "budget burn rate over a window, as the server evaluates it",
            labels=[*labels, "window"],
        )
        evaluated = GaugeMetricFamily(
            "edgefleet_slo_evaluation_seconds", "how long the last SLO evaluation took"
        )
        evaluated_at = GaugeMetricFamily(
            "edgefleet_slo_evaluation_timestamp_seconds", "when the last evaluation ran"
        )
        if last is not None:
            evaluated.add_metric([], last.seconds)
            evaluated_at.add_metric([], last.at)
            for status in last.statuses:
                spec = status.spec
                for o in status.objectives:
                    key = [spec.name, spec.model, spec.hardware_id or "all", str(o.objective.sli)]
                    samples = last.samples.get(spec.name, ())
                    if samples:
                        latest = samples[-1]
                        b, n = events(o.objective, latest)
                        total.add_metric(key, float(n))
                        bad.add_metric(key, float(b))
                    target.add_metric(key, o.objective.target)
                    min_events.add_metric(key, float(o.objective.min_events))
                    remaining.add_metric(key, o.budget_remaining)
                    windows = sorted({w for r in o.rules for w in (r.rule.long_s, r.rule.short_s)})
                    for w in windows:
                        wb, wn = window_events(o.objective, samples, status.at, w)
                        rate = (wb / wn) / o.objective.budget if wn else 0.0
                        burn.add_metric([*key, _window(w)], rate)
        yield from (total, bad, target, min_events, remaining, burn, evaluated, evaluated_at)


def _window(seconds: float) -> str:
    return format_duration(seconds)


def make_registry(context: ServerContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(context))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

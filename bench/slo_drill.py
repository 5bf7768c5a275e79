"""An SLO driven through a traffic profile under a fast-forward clock, for tests and the bench.

Each step the model serves ``rate`` inferences a second with an error share that
the profile gives for that time; errors are drawn binomially (seeded), the totals
sampled, the SLO evaluated and the alerts stepped, exactly as the server's ticker
does with real telemetry. What comes back is every notification with its time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fleet_server.slo.alerts import Alert, AlertKey, Notification, Silence, step_alerts
from fleet_server.slo.burn import evaluate
from fleet_server.slo.series import Sample, Totals, next_sample, thin
from fleet_server.slo.spec import SloSpec


@dataclass
class DrillResult:
    notifications: list[tuple[float, Notification]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    alerts: dict[AlertKey, Alert] = field(default_factory=dict)
    budget_remaining: float = 1.0

    def first(self, status: str, severity: str) -> float | None:
        """Time of the first ``status`` notification of ``severity``, if any."""
        return next(
            (t for t, n in self.notifications if n.status == status and n.alert.key.severity == severity),
            None,
        )


def drill(
    spec: SloSpec,
    error_share: Callable[[float], float],
    *,
    duration_s: float,
    step_s: float = 60.0,
    rate: float = 20.0,
    seed: int = 1,
    silences: Sequence[Silence] = (),
    warmup_s: float = 0.0,
    resolve_s: float | None = None,
) -> DrillResult:
    """Run ``duration_s`` of simulated time (after ``warmup_s`` sampled but not evaluated: the profile
    sees negative times then);
    times in the result count from the end of the warm-up."""
    rng = np.random.default_rng(seed)
    keep_s = max([o.window_s for o in spec.objectives] + [r.long_s for r in spec.rules])
    out = DrillResult()
    totals = Totals()
    samples: list[Sample] = []
    alerts: dict[AlertKey, Alert] = {}
    per_step = int(rate * step_s)
    t = -warmup_s
    steps = 0
    while t <= duration_s:
        share = error_share(t)
        errors = int(rng.binomial(per_step, min(max(share, 0.0), 1.0)))
        totals = Totals(inferences=totals.inferences + per_step, errors=totals.errors + errors)
        samples.append(next_sample(samples[-1] if samples else None, t, totals))
        steps += 1
        if steps % 60 == 0:
            samples = thin(samples, t, keep_s)
        if t >= 0:
            status = evaluate(spec, samples, t)
            result = step_alerts(alerts, [status], silences, t, resolve_s=resolve_s)
            alerts = result.alerts
            out.notifications.extend((t, n) for n in result.notifications)
            out.budget_remaining = min(o.budget_remaining for o in status.objectives)
        t += step_s
    out.samples, out.alerts = samples, alerts
    return out

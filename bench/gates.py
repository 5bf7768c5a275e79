"""The accuracy gate in the simulator's terms: its false alarms over A/A rollouts, and how many
labels it takes to catch a 5-point drop.

Each trial is one rollout driven tick by tick through the real pure engine
(``engine.decide`` then ``engine.apply_plan``, the gates it calls, the figures it
computes), as the ticker runs it: every tick is a look, through every stage, its
soak and the wait for labels. The fleet answers as devices would: each tick every
device serves ``INFERENCES`` inferences, the app labels each with probability
``LABEL_SHARE``, and each label is correct with the serving model's true accuracy
(binomial per device per tick, seeded). Devices not yet assigned keep serving the
replaced model and keep adding to its labels, which is what the ticker's baseline
sums. A notified device serves the new model from the next tick.

- **A/A**: both models 90% accurate. A false alarm is a rollout the accuracy gate
  stopped. Reported with its 95% Wilson interval; target: at most ``alpha``.
- **5-point drop**: replaced 95%, new 90%. Reported: the share of rollouts caught,
  the share caught at the canary stage (so the rest of the fleet never got it), and
  the median number of the new model's labels when the gate tripped.
- **Same-run baseline**: the same trials judged by a one-sided two-proportion z-test
  (same estimate and variance) at ``alpha`` on every tick from the minimum sample on,
  which is what a fixed-sample test looked at every tick does: its false-alarm rate
  is several times ``alpha``. The single-look row is that z-test applied once, when
  the canary stage would promote: about ``alpha``, as designed, which shows it is the
  repeated looks, not the estimate, that inflate it.

``python -m bench gates``; ``run(trials=...)`` for a smaller run (tests/server/test_gate_bench.py).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from statistics import NormalDist
from typing import Any

import numpy as np

from fleet_server import accuracy_stats
from fleet_server.engine import DeviceSnapshot, RolloutSnapshot, apply_plan, decide
from fleet_server.gates import Histograms
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.policy import Policy

NEW, OLD = "n" * 64, "o" * 64
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TICK = timedelta(seconds=1)
DEVICES = 50
STAGES = (10.0, 50.0, 100.0)
INFERENCES = 10  # per device per tick
LABEL_SHARE = 0.5
PRIOR_TICKS = 10  # the replaced model served this long on every device before the rollout
ALPHA = 0.05
# A low floor, so that the test decides when a drop is caught (not the minimum sample), and the
# normal approximation is tried on small samples.
MIN_LABELS = 100


def policy(min_labels: int = MIN_LABELS) -> Policy:
    return Policy(
        soak_seconds=30.0,  # 30 more looks per stage after its devices finished
        device_timeout_seconds=600.0,
        max_accuracy_drop=0.0,
        accuracy_alpha=ALPHA,
        min_labels=min_labels,
    )


SERVING = (DS.NOTIFIED, DS.INSTALLING, DS.DONE)


@dataclass
class Trial:
    stopped: bool = False  # the accuracy gate stopped the rollout
    stage: int | None = None  # at which stage
    labels: int | None = None  # the new model's labels in the stopping decision
    z_every_tick: bool = False  # the fixed-sample z-test, looked at every tick, would have stopped it
    z_once: bool = False  # ... looked at once, when the canary stage promotes
    ticks: int = 0


def z_p_value(labels: int, correct: int, base_labels: int, base_correct: int) -> float:
    """One-sided p of "new < replaced" by a fixed-sample z-test, with the gate's estimate and variance."""
    g = accuracy_stats.Group(labels, correct, base_labels, base_correct)
    c = accuracy_stats.compare([g], 0.0, ALPHA, 1.0)  # only its change and information are used
    assert c is not None
    return 1 - NormalDist().cdf(-c.change * c.information**0.5)


def run_trial(
    p_old: float, p_new: float, seed: int, devices: int = DEVICES, min_labels: int = MIN_LABELS
) -> Trial:
    rng = np.random.default_rng(seed)
    pol = policy(min_labels)
    r = RolloutSnapshot(
        id=f"bench-{seed}",
        state=RS.RUNNING,
        model_sha256=NEW,
        stages=STAGES,
        current_stage=0,
        stage_ready_at=None,
        policy=pol,
    )
    fleet = [
        DeviceSnapshot(device_id=f"d{i:04d}", state=DS.PENDING, running_sha256=OLD) for i in range(devices)
    ]
    prior = rng.binomial(INFERENCES * PRIOR_TICKS, LABEL_SHARE, size=devices)
    base_labels = int(prior.sum())
    base_correct = int(rng.binomial(prior, p_old).sum())
    trial = Trial()
    now = T0
    for tick in range(5000):
        base = {"": Histograms(labels=base_labels, labels_correct=base_correct)}
        plan = decide(r, fleet, now, base)
        for d in plan.decisions:
            if d.action in ("roll_back", "pause") and d.figures.get("gate") == "accuracy":
                trial.stopped, trial.stage, trial.labels = True, r.current_stage, d.figures["labels"]
            if d.action == "next_stage" and r.current_stage == 0:
                f = d.figures
                trial.z_once = z_p_value(*_counts(fleet), base_labels, base_correct) <= ALPHA or trial.z_once
                assert f["labels"] >= pol.min_labels
        labels, correct = _counts(fleet)
        if (
            labels >= pol.min_labels
            and base_labels >= pol.min_labels
            and z_p_value(labels, correct, base_labels, base_correct) <= ALPHA
        ):
            trial.z_every_tick = True
        r, fleet = apply_plan(r, fleet, plan, now)
        if r.state in RS.FINISHED or r.state == RS.PAUSED:
            trial.ticks = tick
            return trial
        now += TICK
        fleet, grown, right = _serve(fleet, rng, p_new, p_old)
        base_labels += grown
        base_correct += right
    raise RuntimeError(f"trial {seed}: no end after 5000 ticks ({r.state}, stage {r.current_stage})")


def _counts(fleet: list[DeviceSnapshot]) -> tuple[int, int]:
    return sum(d.labels for d in fleet), sum(d.labels_correct for d in fleet)


def _serve(
    fleet: list[DeviceSnapshot], rng: np.random.Generator, p_new: float, p_old: float
) -> tuple[list[DeviceSnapshot], int, int]:
    """One tick of serving: the new model on notified devices, the replaced one on the others."""
    n = len(fleet)
    labels = rng.binomial(INFERENCES, LABEL_SHARE, size=n)
    on_new = np.array([d.state in SERVING for d in fleet])
    correct = rng.binomial(labels, np.where(on_new, p_new, p_old))
    out = []
    for i, d in enumerate(fleet):
        if on_new[i]:
            d = dataclasses.replace(
                d,
                running_sha256=NEW,
                served_ok=d.served_ok + INFERENCES,
                inferences=d.inferences + INFERENCES,
                labels=d.labels + int(labels[i]),
                labels_correct=d.labels_correct + int(correct[i]),
            )
        out.append(d)
    old = ~on_new & np.array([d.stage is None for d in fleet])
    return out, int(labels[old].sum()), int(correct[old].sum())


def _pct(k: int, n: int) -> float:
    return round(100 * k / n, 1)


def measure(
    trials: int = 200, devices: int = DEVICES, seed: int = 0, min_labels: int = MIN_LABELS
) -> dict[str, Any]:
    aa = [run_trial(0.90, 0.90, seed + i, devices, min_labels) for i in range(trials)]
    drop = [run_trial(0.95, 0.90, seed + 100_000 + i, devices, min_labels) for i in range(trials)]
    alarms = sum(t.stopped for t in aa)
    lo, hi = accuracy_stats.wilson(alarms, trials) or (0.0, 1.0)
    caught = [t for t in drop if t.stopped]
    return {
        "trials": trials,
        "false_alarms": alarms,
        "false_alarm_rate": alarms / trials,
        "false_alarm_wilson95": (lo, hi),
        "z_every_tick_false_alarms": sum(t.z_every_tick for t in aa),
        "z_once_false_alarms": sum(t.z_once for t in aa),
        "caught": len(caught),
        "caught_at_canary": sum(t.stage == 0 for t in caught),
        "median_labels_to_catch": statistics.median(t.labels or 0 for t in caught) if caught else None,
        "z_every_tick_caught": sum(t.z_every_tick for t in drop),
        "mean_ticks": statistics.mean(t.ticks for t in aa + drop),
    }


def run(trials: int = 200) -> list[dict[str, object]]:
    m = measure(trials)
    n = m["trials"]
    lo, hi = m["false_alarm_wilson95"]
    return [
        {
            "bench": f"accuracy gate: A/A false alarms, {n} rollouts, {len(STAGES)} stages, every tick",
            "baseline": "one-sided z-test at alpha, every tick",
            "baseline_pct": _pct(m["z_every_tick_false_alarms"], n),
            "edgefleet_pct": _pct(m["false_alarms"], n),
            "ratio": round(m["false_alarms"] / max(1, m["z_every_tick_false_alarms"]), 3),
            "target": f"<= {ALPHA:.0%} (alpha)",
            "wilson95_pct": f"{100 * lo:.1f}-{100 * hi:.1f}",
            "z_test_once_pct": _pct(m["z_once_false_alarms"], n),
        },
        {
            "bench": f"accuracy gate: 5-point drop (95% -> 90%), {n} rollouts",
            "baseline": "z-test every tick (invalid: see A/A)",
            "baseline_pct": _pct(m["z_every_tick_caught"], n),
            "edgefleet_pct": _pct(m["caught"], n),
            "ratio": round(m["caught"] / max(1, m["z_every_tick_caught"]), 3),
            "target": "caught at the canary",
            "caught_at_canary_pct": _pct(m["caught_at_canary"], n),
            "median_labels_to_catch": m["median_labels_to_catch"],
        },
    ]


if __name__ == "__main__":
    import json
    import sys
    import time

    t0 = time.perf_counter()
    result = measure(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2, default=str))

"""A/B experiments watched at every look: the always-valid interval against a fixed-horizon test.

Each simulated experiment splits a fleet of three hardware cohorts (50/30/20% of the devices)
into a control and an arm by weight 50/50 in every cohort, as ``fleet_server.experiments``
assigns them. Labels arrive in looks: at each look every arm gets ``per_look`` more labelled
predictions, spread over the cohorts by their share, each one right with the arm's true accuracy
(a Bernoulli draw: the simulator's label model, ``simulator.labels``, draws labels the same way,
right with the serving model's configured probability). After every look the watcher reads

- the always-valid interval (``fleet_server.experiment_stats``): stop and declare a winner as
  soon as it excludes 0;
- a fixed-horizon two-sided z-test at ``alpha``, read the same way at every look (what people do
  with a dashboard: "peeking");
- the same z-test read once, at the planned end (its honest use).

A/A (both arms 90% accurate) gives the false-positive rate of each; A/B (control 90%, arm 93%)
the chance to detect a 3-point lift and the labels it takes. The means comparison repeats the A/A
with a skewed metric (log-normal latencies), the case the normal approximation fits worst.

``python -m bench experiments`` prints the table; ``python bench/experiments.py [trials]`` the
figures as JSON. Seeded: the same seed gives the same figures.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from fleet_server import experiment_stats as es
from fleet_server.accuracy_stats import wilson

ALPHA = 0.05
COHORTS = (0.5, 0.3, 0.2)  # share of the fleet's devices (and labels) per hardware cohort
PER_LOOK = 50  # labels per arm between two looks
LOOKS = 100  # 5,000 labels per arm at the planned end
DESIGN_N = 1000  # labels per arm the interval is tuned for (fixed before any data)
CONTROL = 0.90
LIFT = 0.03


@dataclass
class Trial:
    always_valid_stop: int | None  # look at which the always-valid interval excluded 0 (None: never)
    z_every_look_stop: int | None  # look at which the peeked z-test first rejected
    z_once: bool  # the z-test read once at the end rejected
    labels_at_stop: int | None  # labels (both arms) when the always-valid interval excluded 0
    sign: int  # sign of the effect when the always-valid interval stopped (+1 arm better)


def _split(rng: np.random.Generator, per_look: int) -> list[int]:
    """Labels of one arm at one look, per cohort (multinomial by the cohorts' shares)."""
    return [int(k) for k in rng.multinomial(per_look, COHORTS)]


def run_proportions(
    p_control: float, p_arm: float, seed: int, looks: int = LOOKS, per_look: int = PER_LOOK
) -> Trial:
    rng = np.random.default_rng(seed)
    k = len(COHORTS)
    n = [[0] * k, [0] * k]  # [control, arm][cohort]
    x = [[0] * k, [0] * k]
    v_opt = es.design_information_proportion(DESIGN_N, CONTROL)
    av_stop = z_stop = labels_at = None
    sign = 0
    z_once = False
    for look in range(1, looks + 1):
        for side, p in ((0, p_control), (1, p_arm)):
            for c, m in enumerate(_split(rng, per_look)):
                n[side][c] += m
                x[side][c] += int(rng.binomial(m, p))
        groups = [es.Proportion(n[1][c], x[1][c], n[0][c], x[0][c]) for c in range(k)]
        if av_stop is None:
            eff = es.compare_proportions(groups, ALPHA, v_opt)
            if eff is not None and eff.significant:
                av_stop, labels_at, sign = look, sum(n[0]) + sum(n[1]), 1 if eff.estimate > 0 else -1
        if z_stop is None or look == looks:
            p_z = es.fixed_horizon_p_value(es.proportion_estimates(groups))
            rejected = p_z is not None and p_z <= ALPHA
            if rejected and z_stop is None:
                z_stop = look
            if look == looks:
                z_once = rejected
    return Trial(av_stop, z_stop, z_once, labels_at, sign)


def run_means(seed: int, looks: int = LOOKS, per_look: int = PER_LOOK) -> Trial:
    """A/A on a skewed metric: log-normal latencies (median 20 ms, sigma 0.6), the same in both arms."""
    rng = np.random.default_rng(seed)
    k = len(COHORTS)
    mom = [[es.Moments() for _ in range(k)] for _ in range(2)]
    sd = 20.0 * float(np.sqrt((np.exp(0.36) - 1) * np.exp(0.36)))
    v_opt = es.design_information_mean(DESIGN_N, sd)
    av_stop = z_stop = None
    z_once = False
    for look in range(1, looks + 1):
        for side in (0, 1):
            for c, m in enumerate(_split(rng, per_look)):
                v = rng.lognormal(np.log(20.0) + 0.1 * c, 0.6, m)
                mom[side][c] = mom[side][c] + es.Moments(m, float(v.sum()), float((v * v).sum()))
        pairs = [es.MeanPair(mom[1][c], mom[0][c]) for c in range(k)]
        if av_stop is None:
            eff = es.compare_means(pairs, ALPHA, v_opt)
            if eff is not None and eff.significant:
                av_stop = look
        if z_stop is None or look == looks:
            p_z = es.fixed_horizon_p_value(es.mean_estimates(pairs))
            rejected = p_z is not None and p_z <= ALPHA
            if rejected and z_stop is None:
                z_stop = look
            if look == looks:
                z_once = rejected
    return Trial(av_stop, z_stop, z_once, None, 0)


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(k, n) or (0.0, 1.0)
    return {"count": k, "rate": k / n, "wilson95": (round(lo, 4), round(hi, 4))}


def measure(trials: int = 200, seed: int = 0, looks: int = LOOKS, per_look: int = PER_LOOK) -> dict[str, Any]:
    aa = [run_proportions(CONTROL, CONTROL, seed + i, looks, per_look) for i in range(trials)]
    ab = [
        run_proportions(CONTROL, CONTROL + LIFT, seed + 100_000 + i, looks, per_look) for i in range(trials)
    ]
    means = [run_means(seed + 200_000 + i, looks, per_look) for i in range(trials)]
    detected = [t for t in ab if t.always_valid_stop is not None and t.sign > 0]
    return {
        "trials": trials,
        "looks": looks,
        "labels_per_arm_per_look": per_look,
        "alpha": ALPHA,
        "aa_always_valid": _rate(sum(t.always_valid_stop is not None for t in aa), trials),
        "aa_z_every_look": _rate(sum(t.z_every_look_stop is not None for t in aa), trials),
        "aa_z_once": _rate(sum(t.z_once for t in aa), trials),
        "aa_means_always_valid": _rate(sum(t.always_valid_stop is not None for t in means), trials),
        "aa_means_z_every_look": _rate(sum(t.z_every_look_stop is not None for t in means), trials),
        "lift_detected": _rate(len(detected), trials),
        "lift_wrong_sign": sum(t.always_valid_stop is not None and t.sign < 0 for t in ab),
        "lift_median_labels": statistics.median(t.labels_at_stop or 0 for t in detected)
        if detected
        else None,
        "lift_p90_labels": (
            round(float(np.percentile([t.labels_at_stop or 0 for t in detected], 90))) if detected else None
        ),
        # a fixed-horizon design for the same lift at 90% power, two-sided alpha: labels, both arms
        "fixed_design_labels_90pct_power": _fixed_design(CONTROL, CONTROL + LIFT),
        "lift_z_once_detected": _rate(sum(t.z_once for t in ab), trials),
    }


def _fixed_design(p0: float, p1: float, power: float = 0.9) -> int:
    """Labels (both arms) a fixed-horizon z-test needs to detect ``p1 - p0`` with ``power``."""
    z = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(power)
    per_arm = z * z * (p0 * (1 - p0) + p1 * (1 - p1)) / (p1 - p0) ** 2
    return 2 * math.ceil(per_arm)


def _pct(r: dict[str, Any]) -> float:
    return round(100 * float(r["rate"]), 1)


def run(trials: int = 200) -> list[dict[str, object]]:
    m = measure(trials)
    n, looks = m["trials"], m["looks"]
    av, zl = m["aa_always_valid"], m["aa_z_every_look"]
    lo, hi = av["wilson95"]
    return [
        {
            "bench": f"experiments: A/A false positives, {n} experiments x {looks} looks (accuracy 90%)",
            "baseline": "fixed-horizon z-test read at every look",
            "baseline_pct": _pct(zl),
            "edgefleet_pct": _pct(av),
            "ratio": round(av["count"] / max(1, zl["count"]), 3),
            "target": f"<= {ALPHA:.0%} (alpha)",
            "wilson95_pct": f"{100 * lo:.1f}-{100 * hi:.1f}",
            "z_test_read_once_pct": _pct(m["aa_z_once"]),
        },
        {
            "bench": f"experiments: A/A false positives, means (log-normal latency), {n} x {looks} looks",
            "baseline": "fixed-horizon z-test read at every look",
            "baseline_pct": _pct(m["aa_means_z_every_look"]),
            "edgefleet_pct": _pct(m["aa_means_always_valid"]),
            "ratio": round(
                m["aa_means_always_valid"]["count"] / max(1, m["aa_means_z_every_look"]["count"]), 3
            ),
            "target": f"<= {ALPHA:.0%} (alpha)",
            "wilson95_pct": "-".join(f"{100 * v:.1f}" for v in m["aa_means_always_valid"]["wilson95"]),
        },
        {
            "bench": f"experiments: 3-point lift (90% -> 93%), {n} experiments, stop when significant",
            "baseline": "z-test read once at 5,000 labels per arm",
            "baseline_pct": _pct(m["lift_z_once_detected"]),
            "edgefleet_pct": _pct(m["lift_detected"]),
            "ratio": round(m["lift_detected"]["count"] / max(1, m["lift_z_once_detected"]["count"]), 3),
            "target": "detected; median labels reported",
            "median_labels_both_arms": m["lift_median_labels"],
            "p90_labels_both_arms": m["lift_p90_labels"],
            "wrong_sign": m["lift_wrong_sign"],
            "fixed_design_labels_90pct_power": m["fixed_design_labels_90pct_power"],
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

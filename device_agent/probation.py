"""Probation: judging a freshly swapped-in model from its counts, and the record that survives a restart.

After a swap with ``directive.probation`` the agent keeps the previous model
loaded and asks :func:`verdict` every few tens of milliseconds whether the new
one passes, must be reverted (and why), or needs more time. The verdict reads
totals only (ok and failed inferences, latency histograms), so it is a pure
function the tests drive with made-up counts.

The rules, in order:

1. a model under which the agent restarted more than ``MAX_BOOTS`` times during
   one probation is blamed for it (``crash_loop``);
2. once ``min_inferences`` calls were made, an error rate above
   ``max_error_rate`` reverts at once (``error_rate``);
3. success needs both the window (``seconds``) and ``min_inferences`` ok calls;
4. then the new p95 latency must stay within ``max_latency_ratio`` of the old
   model's on this device, when both have ``MIN_LATENCY_SAMPLES`` calls to compare
   (``latency_regression``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from device_agent.wire import Probation, ProtocolError, ReasonCode, latency_quantile

if TYPE_CHECKING:
    from device_agent.telemetry import ModelTotals

MAX_BOOTS = 3  # restarts during one probation before the model is blamed (crash loop)
MIN_LATENCY_SAMPLES = 20  # per model, before a p95 comparison means anything


@dataclass(frozen=True)
class ProbationRecord:
    """A swap still on probation. Saved in the same atomic write as the activation, so a power
    cut mid-probation resumes it (or, after ``MAX_BOOTS`` restarts, reverts it)."""

    seq: int
    slot: str  # the slot now serving, on probation
    previous: str | None  # the slot to go back to (None: the first model, nothing to revert to)
    sha256: str
    params: Probation
    min_inferences: int  # ok calls needed: the larger of the probation's and the directive's
    boots: int = 0  # restarts since the swap

    def rebooted(self) -> ProbationRecord:
        return replace(self, boots=self.boots + 1)

    def to_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "slot": self.slot,
            "previous": self.previous,
            "sha256": self.sha256,
            "params": self.params.to_dict(),
            "min_inferences": self.min_inferences,
            "boots": self.boots,
        }

    @classmethod
    def from_dict(cls, data: object) -> ProbationRecord | None:
        """Read a stored record; None for anything damaged (the swap then simply stands)."""
        if not isinstance(data, dict):
            return None
        try:
            params = Probation.from_dict(data.get("params") or {})
        except ProtocolError:
            return None
        slot, previous, sha = data.get("slot"), data.get("previous"), data.get("sha256")
        seq, boots = _count(data.get("seq")), _count(data.get("boots", 0))
        min_n = _count(data.get("min_inferences", params.min_inferences))
        if seq is None or boots is None or min_n is None:
            return None
        if not isinstance(slot, str) or not isinstance(sha, str) or not isinstance(previous, str | None):
            return None
        return cls(seq, slot, previous, sha, params, min_n, boots)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class Pass:
    ok: int  # ok inferences the new model served during its probation


@dataclass(frozen=True)
class Revert:
    reason: ReasonCode
    detail: str


@dataclass(frozen=True)
class Wait:
    pass


Verdict = Pass | Revert | Wait


def verdict(
    record: ProbationRecord, elapsed_s: float, base: ModelTotals, now: ModelTotals, old: ModelTotals
) -> Verdict:
    """Judge the model on probation.

    ``base``/``now``: the new model's totals when the probation (re)started and now;
    ``old``: the previous model's totals, the latency reference on this device.
    """
    params = record.params
    if record.boots > MAX_BOOTS:
        return Revert(ReasonCode.CRASH_LOOP, f"restarted {record.boots} times during probation")
    ok, errors = now.ok - base.ok, now.errors - base.errors
    n = ok + errors
    if n and n >= max(record.min_inferences, 1) and errors / n > params.max_error_rate:
        return Revert(ReasonCode.ERROR_RATE, f"{errors}/{n} failed > {params.max_error_rate:.3f} allowed")
    if elapsed_s < params.seconds or ok < record.min_inferences:
        return Wait()
    new_buckets = [a - b for a, b in zip(now.buckets, base.buckets, strict=True)]
    p_new, p_old = latency_quantile(new_buckets, 0.95), latency_quantile(old.buckets, 0.95)
    if (
        p_new is not None
        and p_old is not None
        and sum(new_buckets) >= MIN_LATENCY_SAMPLES
        and sum(old.buckets) >= MIN_LATENCY_SAMPLES
        and p_new > params.max_latency_ratio * p_old
    ):
        return Revert(
            ReasonCode.LATENCY_REGRESSION,
            f"p95 {p_new:.0f} us > {params.max_latency_ratio} x old p95 {p_old:.0f} us",
        )
    return Pass(ok)


__all__ = [
    "MAX_BOOTS",
    "MIN_LATENCY_SAMPLES",
    "Pass",
    "ProbationRecord",
    "Revert",
    "Verdict",
    "Wait",
    "verdict",
]

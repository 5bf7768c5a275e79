"""Build and sign the desired-state directives the server publishes to devices.

A directive names the model by absolute URLs on ``public_url`` plus the hash and
length the device must find in the release-signed bundle (Uptane's
director/image split), and carries a seq higher than any sent to that device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from device_agent import protocol
from fleet_server.models import Model
from fleet_server.policy import Policy, activation_for, metered_for
from signing.dsse import sign_envelope
from signing.keys import KeyPair


def model_ref(model: Model, public_url: str) -> protocol.ModelRef:
    base = f"{public_url.rstrip('/')}/api/v1/artifacts/{model.sha256}"
    return protocol.ModelRef(
        name=model.name,
        version=model.version,
        release=model.release,
        target=model.target,
        sha256=model.sha256,
        length=model.length,
        model_url=base,
        envelope_url=f"{base}/envelope",
    )


def build_directive(
    device_id: str,
    seq: int,
    model: Model | None,
    *,
    public_url: str,
    ttl_seconds: float,
    now: datetime,
    rollout_id: str | None = None,
    shadow: Model | None = None,
    policy: Policy | None = None,
    hardware_id: str = "",
    tags: Mapping[str, str] | None = None,
) -> protocol.Directive:
    """``policy`` adds the agent-side probation (and the shadow sample rate, and the capture
    policy with this server's upload URL) the rollout asks for, and the maintenance windows,
    deferral cap and metered-link rule of the device's cohort (``hardware_id``, ``tags``).

    A directive without a policy (a roll back to the previous model) carries no probation and
    leaves the sample rate at the wire's default: the device goes back to a model it ran before.
    A shadow directive carries no probation either: it does not change the model served.
    """
    probation = None
    if policy is not None and policy.probation is not None and shadow is None:
        probation = protocol.Probation.model_validate(policy.probation.model_dump())
    # Left out, these take the wire's defaults: no probation, the agent's own sample rate.
    steer: dict[str, Any] = {}
    if probation is not None:  # the agent reports success only once the probation's minimum is served
        steer["probation_inferences"] = probation.min_inferences
    if policy is not None:
        steer["shadow_sample_rate"] = policy.shadow_sample_rate
    if policy is not None and policy.capture is not None and shadow is None and model is not None:
        # capture what the device serves: a shadow directive keeps the old model, a roll back
        # (no policy) stops sampling; what the device holds still goes out
        steer["capture"] = protocol.Capture(
            upload_url=f"{public_url.rstrip('/')}/api/v1/captures", **policy.capture.model_dump()
        )
    if policy is not None:
        # Signed with the rest, so the device keeps to them offline too. A shadow directive swaps
        # nothing in (no window); a roll back (no policy) goes in at once.
        if shadow is None and model is not None:
            steer["activation"] = activation_for(policy, hardware_id, tags or {})
        metered = metered_for(policy, hardware_id, tags or {})
        if metered is not None:
            steer["metered"] = metered
    return protocol.Directive(
        device_id=device_id,
        seq=seq,
        issued_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
        model=model_ref(model, public_url) if model is not None else None,
        rollout_id=rollout_id,
        probation=probation,
        shadow=model_ref(shadow, public_url) if shadow is not None else None,
        **steer,
    )


def sign_directive(directive: protocol.Directive, fleet_key: KeyPair) -> bytes:
    """The retained payload for ``ef/v1/{device}/desired``: a DSSE envelope by the fleet key."""
    payload = directive.model_dump_json().encode()
    return json.dumps(sign_envelope(payload, protocol.DIRECTIVE_PAYLOAD_TYPE, [fleet_key])).encode()

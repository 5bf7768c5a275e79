"""DSSE envelopes (the signature wrapper used by in-toto and OpenSSF model signing).

Signatures cover PAE(payloadType, payload), so a payload signed as one type can
never be replayed as another (a directive cannot pass for a bundle statement).

An envelope arrives from the network before anything vouches for it (a directive
from the broker, a bundle uploaded to the server), so it is parsed with
:mod:`signing.safejson`: too large, too deeply nested or not JSON at all is one
``MalformedEnvelope``, never a ``RecursionError`` escaping the caller's handler.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any

from signing import safejson
from signing.errors import BadSignature, MalformedEnvelope, ThresholdNotMet, UnknownKey, WrongPayloadType
from signing.keys import KeyPair, PublicKey


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-authentication encoding from the DSSE spec."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_envelope(payload: bytes, payload_type: str, signers: Iterable[KeyPair]) -> dict[str, Any]:
    message = pae(payload_type, payload)
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"keyid": k.keyid, "sig": base64.b64encode(k.sign(message)).decode()} for k in signers
        ],
    }


def parse_envelope(raw: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """Parse an envelope from bytes/str/dict, raising MalformedEnvelope on any shape error."""
    if isinstance(raw, (bytes, str)):
        try:
            data = safejson.loads(raw)
        except safejson.JsonError as exc:
            raise MalformedEnvelope(f"envelope is not JSON: {exc}") from exc
    else:
        data = dict(raw)
    if not isinstance(data, dict):
        raise MalformedEnvelope("envelope is not a JSON object")
    if not isinstance(data.get("payloadType"), str) or not isinstance(data.get("payload"), str):
        raise MalformedEnvelope("envelope lacks payloadType/payload strings")
    sigs = data.get("signatures")
    if not isinstance(sigs, list) or not all(
        isinstance(s, dict) and isinstance(s.get("keyid"), str) and isinstance(s.get("sig"), str)
        for s in sigs
    ):
        raise MalformedEnvelope("envelope signatures must be a list of {keyid, sig}")
    return data


def verify_envelope(
    raw: bytes | str | Mapping[str, Any],
    payload_type: str,
    trusted: Mapping[str, PublicKey],
    threshold: int = 1,
) -> bytes:
    """Return the payload once ``threshold`` distinct trusted keys have validly signed it.

    Raises the specific TrustError: malformed, wrong type, no trusted signer, or a
    trusted key id whose signature does not verify (tampering).
    """
    env = parse_envelope(raw)
    if env["payloadType"] != payload_type:
        raise WrongPayloadType(f"expected payload type {payload_type!r}, got {env['payloadType']!r}")
    try:
        payload = base64.b64decode(env["payload"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedEnvelope(f"payload is not base64: {exc}") from exc
    message = pae(payload_type, payload)
    valid: set[str] = set()
    tampered = False
    for sig in env["signatures"]:
        key = trusted.get(sig["keyid"])
        if key is None:
            continue
        try:
            raw_sig = base64.b64decode(sig["sig"], validate=True)
        except (binascii.Error, ValueError):
            tampered = True
            continue
        if key.verify(raw_sig, message):
            valid.add(sig["keyid"])
        else:
            tampered = True
    if len(valid) >= threshold:
        return payload
    if tampered:
        raise BadSignature("a signature by a trusted key does not verify: content was altered")
    if valid:
        raise ThresholdNotMet(f"{len(valid)} of {threshold} required trusted signatures")
    raise UnknownKey("no signature by a trusted key")

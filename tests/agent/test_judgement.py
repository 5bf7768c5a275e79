"""Directive judgement and the agreement checks, as pure functions: real keys and envelopes, no I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import wire
from device_agent.judgement import (
    Accept,
    DeviceFit,
    Duplicate,
    Mark,
    RefreshRoot,
    Reject,
    RootWalk,
    check_disk,
    check_manifest,
    check_target,
    judge,
)
from device_agent.wire import ReasonCode
from signing.dsse import parse_envelope, sign_envelope
from signing.errors import DeliveryUnavailable, MalformedEnvelope, MetadataUnsigned
from signing.keys import KeyPair, generate_keypair
from signing.manifest import BundleManifest

from .test_wire import SHA, _ref

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DEV = "dev-1"
FLEET = generate_keypair()
KEYS = {FLEET.keyid: FLEET.public}


def _payload(seq: int, device: str = DEV, ttl: float = 3600, key: KeyPair = FLEET, **kw: Any) -> bytes:
    doc = {
        "device_id": device,
        "seq": seq,
        "issued_at": NOW.isoformat(),
        "expires_at": (NOW + timedelta(seconds=ttl)).isoformat(),
        "model": _ref(),
        **kw,
    }
    env = sign_envelope(json.dumps(doc).encode(), wire.DIRECTIVE_PAYLOAD_TYPE, [key])
    return json.dumps(env).encode()


def _judge(payload: bytes, mark: Mark = Mark(), root: RootWalk = RootWalk()) -> Any:
    return judge(payload, keys=KEYS, device_id=DEV, mark=mark, now=NOW, root=root)


def test_a_good_directive_is_accepted_and_moves_the_mark() -> None:
    verdict = _judge(_payload(5))
    assert isinstance(verdict, Accept)
    assert verdict.directive.seq == 5 and verdict.mark.seq == 5 and verdict.mark.digest
    # the same bytes again (a reconnect): a duplicate, also when the seq is known from disk only
    assert _judge(_payload(5), verdict.mark) == Duplicate(5)
    assert _judge(_payload(5), Mark(5, None)) == Duplicate(5)


@pytest.mark.parametrize(
    ("payload", "mark", "reason", "seq"),
    [
        (_payload(5, device="dev-2"), Mark(), ReasonCode.WRONG_DEVICE, 5),
        (_payload(4), Mark(5, "x"), ReasonCode.STALE_SEQUENCE, 4),
        (_payload(5), Mark(5, "not-this-one"), ReasonCode.STALE_SEQUENCE, 5),
        (_payload(6, ttl=-1), Mark(5), ReasonCode.EXPIRED, 6),
        (_payload(6, key=generate_keypair()), Mark(), ReasonCode.UNKNOWN_KEY, 0),
        (b"\x00\xffgarbage", Mark(), ReasonCode.MALFORMED_ENVELOPE, 0),
        (b"[" * 100_000 + b"]" * 100_000, Mark(), ReasonCode.MALFORMED_ENVELOPE, 0),
        (b"x" * (wire.MAX_PAYLOAD + 1), Mark(), ReasonCode.MALFORMED_ENVELOPE, 0),
    ],
    ids=[
        "wrong-device",
        "stale",
        "same-seq-other-bytes",
        "expired",
        "unknown-key",
        "garbage",
        "deep",
        "huge",
    ],
)
def test_refusals_name_their_reason(payload: bytes, mark: Mark, reason: ReasonCode, seq: int) -> None:
    verdict = _judge(payload, mark)
    assert isinstance(verdict, Reject), verdict
    assert verdict.reason == reason and verdict.seq == seq and verdict.detail


def test_a_signed_payload_that_is_no_directive_is_malformed() -> None:
    for body in (b'{"hello": 1}', b"[" * 5000 + b"]" * 5000):
        env = json.dumps(sign_envelope(body, wire.DIRECTIVE_PAYLOAD_TYPE, [FLEET])).encode()
        verdict = _judge(env)
        assert isinstance(verdict, Reject) and verdict.malformed
        assert verdict.reason == ReasonCode.MALFORMED_DIRECTIVE and verdict.seq == 0


def test_a_tampered_directive_is_a_bad_signature() -> None:
    env = json.loads(_payload(7))
    env["signatures"][0]["sig"] = env["signatures"][0]["sig"][::-1]
    verdict = _judge(json.dumps(env).encode())
    assert (
        isinstance(verdict, Reject) and verdict.reason == ReasonCode.BAD_SIGNATURE and not verdict.malformed
    )


def test_an_unknown_key_asks_for_the_root_chain_once() -> None:
    stranger = _payload(9, key=generate_keypair())
    assert isinstance(_judge(stranger, root=RootWalk(possible=True)), RefreshRoot)
    # the walk refused a forged root: that refusal is the reason reported
    refused = _judge(stranger, root=RootWalk(failure=MetadataUnsigned("root v3 not signed by v2's keys")))
    assert isinstance(refused, Reject) and refused.reason == ReasonCode.METADATA_UNSIGNED
    # the repository was away: not a verdict on the root, the key stays unknown
    away = _judge(stranger, root=RootWalk(failure=DeliveryUnavailable("HTTP 503")))
    assert isinstance(away, Reject) and away.reason == ReasonCode.UNKNOWN_KEY and "503" in away.detail


def test_parse_envelope_bounds_depth() -> None:
    with pytest.raises(MalformedEnvelope):
        parse_envelope(b'{"payloadType": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(wire.ProtocolError):
        wire.decode_directive(b"{" * 50_000)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 12),  # seq
            st.sampled_from([DEV, DEV, "dev-2"]),  # device
            st.sampled_from([3600.0, 3600.0, -1.0]),  # ttl
            st.booleans(),  # signed by the fleet key
            st.integers(0, 2),  # payload variant: same seq, other bytes
        ),
        max_size=25,
    )
)
def test_the_accepted_seq_never_decreases(messages: list[tuple[int, str, float, bool, int]]) -> None:
    mark = Mark()
    accepted: list[int] = []
    for seq, device, ttl, signed, variant in messages:
        key = FLEET if signed else generate_keypair()
        verdict = _judge(_payload(seq, device=device, ttl=ttl, key=key, rollout_id=f"r{variant}"), mark)
        if isinstance(verdict, Accept):
            assert verdict.mark.seq > mark.seq
            assert signed and device == DEV and ttl > 0
            mark = verdict.mark
            accepted.append(seq)
        elif isinstance(verdict, Duplicate):
            assert verdict.seq == mark.seq
    assert accepted == sorted(set(accepted))


def test_restored_mark_reruns_an_unfinished_directive() -> None:
    assert Mark.restored(5) == Mark(5)
    assert Mark.restored(5, 7) == Mark(6)  # 7 was accepted but never finished: it may run again
    assert Mark.restored(5, 5) == Mark(5)
    assert Mark.restored(5, 2) == Mark(5)


FIT = DeviceFit("rpi4", ("arm64-cpu", "tflite-int8"), frozenset({"arm64-cpu"}), lambda t: "no LiteRT here")


def _manifest(**kw: Any) -> BundleManifest:
    doc: dict[str, Any] = {
        "name": "tiny",
        "version": "2",
        "release": 2,
        "target": "arm64-cpu",
        "hardware_ids": ["rpi4"],
        "files": [{"path": "model.onnx", "sha256": SHA, "length": 1234}],
    }
    doc.update(kw)
    return BundleManifest.from_dict(doc)


def test_agreement_with_the_signed_manifest() -> None:
    ref = wire.ModelRef.from_dict(_ref())
    assert check_manifest(ref, _manifest(), FIT) is None
    mismatch = check_manifest(wire.ModelRef.from_dict(_ref(length=99)), _manifest(), FIT)
    assert mismatch is not None and mismatch.reason == ReasonCode.DIRECTIVE_MISMATCH
    jetson = check_manifest(ref, _manifest(hardware_ids=["jetson"]), FIT)
    assert jetson is not None and jetson.reason == ReasonCode.HARDWARE_MISMATCH
    npu = check_manifest(ref, _manifest(target="ethos-u55"), FIT)
    assert npu is not None and npu.reason == ReasonCode.UNSUPPORTED_TARGET
    # provisioned for tflite but the runtime cannot load it: the runtime's reason is the detail
    refused = check_target("tflite-int8", FIT)
    assert refused is not None and "no LiteRT here" in refused.detail
    assert check_target("arm64-cpu", FIT) is None


def test_disk_room_counts_what_is_already_downloaded() -> None:
    assert check_disk(free=100, have=0, length=80, reserve=20) is None
    assert check_disk(free=100, have=10, length=100, reserve=10) is None
    short = check_disk(free=100, have=0, length=90, reserve=20)
    assert short is not None and short.reason == ReasonCode.INSUFFICIENT_DISK and "need 110" in short.detail

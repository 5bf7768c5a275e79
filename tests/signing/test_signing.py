"""Every way a signature, manifest or trust root check fails has its own error."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from signing import errors
from signing.dsse import sign_envelope, verify_envelope
from signing.keyring import KeyDir, init_keys
from signing.keys import KeyPair, PublicKey, generate_keypair
from signing.manifest import (
    ENVELOPE_NAME,
    manifest_from_envelope,
    read_bundle,
    sign_bundle,
    verify_bundle,
)
from signing.trust import TrustRoot, create_trust_root

FIELDS = {"name": "m", "version": "1", "release": 3, "target": "arm64-cpu", "hardware_ids": ["rpi4"]}


@pytest.fixture
def bundle(tmp_path: Path, keydir: KeyDir) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"\x08\x07" * 5000)
    sign_bundle(d, {**FIELDS, "io_signature": {"inputs": []}}, ["model.onnx"], keydir.key("release"))
    return d


def trusted(keydir: KeyDir) -> dict[str, PublicKey]:
    return keydir.trust_root().release_keys


def test_bundle_round_trip(bundle: Path, keydir: KeyDir) -> None:
    m = verify_bundle(bundle, trusted(keydir))
    assert (m.name, m.version, m.release, m.hardware_ids) == ("m", "1", 3, ["rpi4"])
    assert m.model_file.length == 10000
    assert read_bundle(bundle) == m


def test_tampered_file(bundle: Path, keydir: KeyDir) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[100] ^= 1
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(errors.DigestMismatch):
        verify_bundle(bundle, trusted(keydir))


def test_truncated_and_oversized_file(bundle: Path, keydir: KeyDir) -> None:
    original = (bundle / "model.onnx").read_bytes()
    (bundle / "model.onnx").write_bytes(original[:-1])
    with pytest.raises(errors.LengthMismatch):
        verify_bundle(bundle, trusted(keydir))
    (bundle / "model.onnx").write_bytes(original + b"x" * 10)
    with pytest.raises(errors.LengthMismatch):
        verify_bundle(bundle, trusted(keydir))


def test_unsigned_missing_and_extra_files(bundle: Path, keydir: KeyDir) -> None:
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(errors.UnexpectedFile):
        verify_bundle(bundle, trusted(keydir))
    (bundle / "extra.bin").unlink()
    (bundle / "model.onnx").unlink()
    with pytest.raises(errors.MissingFile):
        verify_bundle(bundle, trusted(keydir))
    (bundle / ENVELOPE_NAME).unlink()
    with pytest.raises(errors.MissingFile, match="unsigned"):
        verify_bundle(bundle, trusted(keydir))


def test_unknown_key(bundle: Path, tmp_path: Path) -> None:
    init_keys(tmp_path / "other")
    with pytest.raises(errors.UnknownKey):
        verify_bundle(bundle, KeyDir(tmp_path / "other").trust_root().release_keys)


def test_fleet_key_cannot_sign_bundles(bundle: Path, keydir: KeyDir) -> None:
    """The online fleet key alone must never be enough to release a model."""
    sign_bundle(bundle, FIELDS, ["model.onnx"], keydir.key("fleet"))
    with pytest.raises(errors.UnknownKey):
        verify_bundle(bundle, trusted(keydir))


def test_tampered_manifest_payload(bundle: Path, keydir: KeyDir) -> None:
    env = json.loads((bundle / ENVELOPE_NAME).read_text())
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"]["hardware_ids"] = ["any"]
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(errors.BadSignature):
        manifest_from_envelope(json.dumps(env), trusted(keydir))


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[]", b'{"payloadType": "x"}', b'{"payloadType":"x","payload":"!!","signatures":[]}'],
)
def test_malformed_envelopes(raw: bytes, keydir: KeyDir) -> None:
    with pytest.raises((errors.MalformedEnvelope, errors.WrongPayloadType)):
        manifest_from_envelope(raw, trusted(keydir))


def test_payload_type_is_bound() -> None:
    key = generate_keypair()
    env = sign_envelope(b"{}", "application/vnd.edgefleet.directive+json", [key])
    with pytest.raises(errors.WrongPayloadType):
        verify_envelope(env, "application/vnd.in-toto+json", {key.keyid: key.public})
    # changing the type in the envelope breaks the signature (PAE binds it)
    env["payloadType"] = "application/vnd.in-toto+json"
    with pytest.raises(errors.BadSignature):
        verify_envelope(env, "application/vnd.in-toto+json", {key.keyid: key.public})


def test_threshold() -> None:
    a, b = generate_keypair(), generate_keypair()
    keys = {a.keyid: a.public, b.keyid: b.public}
    env = sign_envelope(b"x", "t", [a])
    with pytest.raises(errors.ThresholdNotMet):
        verify_envelope(env, "t", keys, threshold=2)
    assert verify_envelope(sign_envelope(b"x", "t", [a, b]), "t", keys, threshold=2) == b"x"
    # the same key twice does not count twice
    with pytest.raises(errors.ThresholdNotMet):
        verify_envelope(sign_envelope(b"x", "t", [a, a]), "t", keys, threshold=2)


def test_trust_root_tamper_and_expiry(tmp_path: Path) -> None:
    root = generate_keypair()
    release = generate_keypair()
    trust = create_trust_root([root], [release.public], [generate_keypair().public])
    again = TrustRoot.load(trust.to_bytes())
    assert again.release_keys == trust.release_keys
    env = json.loads(trust.to_bytes())
    body = json.loads(base64.b64decode(env["payload"]))
    body["release_keys"].append(generate_keypair().public.to_dict())
    env["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(errors.BadSignature):
        TrustRoot.load(json.dumps(env))
    with pytest.raises(errors.ExpiredMetadata):
        TrustRoot.load(trust.to_bytes(), now=datetime.now(UTC) + timedelta(days=800))


def test_private_keys_are_owner_only(keydir: KeyDir) -> None:
    for role in ("root", "release", "fleet"):
        assert (keydir.path / f"{role}.key").stat().st_mode & 0o077 == 0
        assert isinstance(keydir.key(role), KeyPair)

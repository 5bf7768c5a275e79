"""ECDSA P-256 release keys and the OpenSSF model-signing bundle form, checked by the real
``model_signing`` verifier and by our own (``cryptography`` only) device-side checks."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import model_signing
import pytest
from tuf.api.metadata import Metadata, Root, Targets

from signing import errors, openssf
from signing.dsse import sign_envelope
from signing.keyring import RELEASE_PUB_FILE, KeyDir, init_keys, revoke_key, rotate_keys
from signing.keys import ECDSA_P256, ED25519, KeyPair, PublicKey, generate_keypair
from signing.manifest import (
    ENVELOPE_NAME,
    PAYLOAD_TYPE,
    STATEMENT_TYPE,
    envelope_of,
    manifest_from_envelope,
    openssf_statement_for,
    read_bundle,
    sign_bundle,
    verify_bundle,
)
from signing.targets import TargetCustom
from signing.trust import TrustRoot
from signing.tuf_release import release_keys_of, sign_target_added, verify_targets_update
from signing.tuf_repo import public_key_of, sslib_key
from tests.support.fresh_imports import imported_by

FIELDS = {"name": "m", "version": "2", "release": 2, "target": "arm64-cpu", "hardware_ids": ["rpi4"]}


@pytest.fixture
def p256_keys(tmp_path: Path) -> KeyDir:
    init_keys(tmp_path / "keys", release_algorithm="ecdsa-p256")
    return KeyDir(tmp_path / "keys")


@pytest.fixture
def p256_bundle(tmp_path: Path, p256_keys: KeyDir) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (d / "labels.txt").write_text("cat\ndog\n")
    sign_bundle(d, FIELDS, ["model.onnx", "labels.txt"], p256_keys.key("release"))
    return d


def model_signing_verify(bundle: Path, public_key: Path) -> None:
    """The real OpenSSF verifier, as a third party calls it (raises ValueError when it refuses)."""
    config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    config.verify(bundle, bundle / ENVELOPE_NAME)


def test_p256_keys_sign_verify_and_round_trip(tmp_path: Path) -> None:
    kp = generate_keypair("ecdsa-p256")
    assert kp.scheme == ECDSA_P256 and len(kp.public.raw) == 65 and kp.public.raw[0] == 4
    sig = kp.sign(b"data")
    assert kp.public.verify(sig, b"data") and not kp.public.verify(sig, b"datA")
    assert not kp.public.verify(b"\x30\x00", b"data")  # malformed DER is a refusal, not a crash
    assert PublicKey.from_dict(kp.public.to_dict()) == kp.public
    assert PublicKey.from_pem(kp.public.to_pem()) == kp.public
    assert public_key_of(sslib_key(kp.public)) == kp.public
    kp.save(tmp_path / "k.key", b"pass phrase")
    assert KeyPair.load(tmp_path / "k.key", b"pass phrase").keyid == kp.keyid
    # the same raw bytes under the other scheme are not the same key
    with pytest.raises(ValueError):
        PublicKey.from_dict({**kp.public.to_dict(), "scheme": "ecdsa-sha2-nistp384"})
    assert generate_keypair().scheme == ED25519


def test_keys_init_p256_release_and_rotation_keeps_the_algorithm(p256_keys: KeyDir) -> None:
    trust = p256_keys.trust_root()
    [release] = trust.release_keys.values()
    assert release.scheme == ECDSA_P256
    assert {k.scheme for k in [*trust.root_keys.values(), *trust.fleet_keys.values()]} == {ED25519}
    assert PublicKey.from_pem((p256_keys.path / RELEASE_PUB_FILE).read_bytes()) == release
    assert release_keys_of(p256_keys.tuf_root()) == [release]
    v2 = rotate_keys(p256_keys, release=True)
    [new] = v2.release_keys.values()
    assert new.scheme == ECDSA_P256 and new != release
    assert PublicKey.from_pem((p256_keys.path / RELEASE_PUB_FILE).read_bytes()) == new
    # a device pinned at v1 follows to v2 and learns the new P-256 key
    v1 = TrustRoot.load((p256_keys.path / "roots" / "1.trust.json").read_bytes())
    assert v1.follow(p256_keys.trust_chain(1)).release_keys == {new.keyid: new}
    v3 = revoke_key(p256_keys, new.keyid[:12])
    assert [k.scheme for k in v3.release_keys.values()] == [ECDSA_P256]
    v4 = rotate_keys(p256_keys, release=True, release_algorithm="ed25519")
    assert [k.scheme for k in v4.release_keys.values()] == [ED25519]


def test_p256_bundle_is_a_sigstore_bundle_with_the_model_signing_predicate(p256_bundle: Path) -> None:
    doc = json.loads((p256_bundle / ENVELOPE_NAME).read_text())
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert doc["verificationMaterial"]["publicKey"]["hint"]
    env = doc["dsseEnvelope"]
    assert env["payloadType"] == "application/vnd.in-toto+json" and len(env["signatures"]) == 1
    statement = json.loads(base64.b64decode(env["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    predicate = statement["predicate"]
    assert [r["name"] for r in predicate["resources"]] == ["labels.txt", "model.onnx"]
    assert predicate["serialization"]["ignore_paths"] == [ENVELOPE_NAME]
    # edgefleet's manifest is kept whole, lengths and all
    assert predicate["edgefleet"]["release"] == 2 and predicate["edgefleet"]["files"][0]["length"] == 10240


def test_model_signing_verifies_what_our_verifier_accepts(p256_bundle: Path, p256_keys: KeyDir) -> None:
    trusted = p256_keys.trust_root().release_keys
    manifest = verify_bundle(p256_bundle, trusted)
    assert manifest.ref == "m:2" and manifest.model_file.path == "model.onnx"
    assert read_bundle(p256_bundle) == manifest
    model_signing_verify(p256_bundle, p256_keys.path / RELEASE_PUB_FILE)


@pytest.mark.parametrize("attack", ["tampered", "extra file", "missing file", "other key"])
def test_both_verifiers_refuse_a_changed_bundle(
    attack: str, p256_bundle: Path, p256_keys: KeyDir, tmp_path: Path
) -> None:
    trusted = p256_keys.trust_root().release_keys
    pub = p256_keys.path / RELEASE_PUB_FILE
    if attack == "tampered":
        data = bytearray((p256_bundle / "model.onnx").read_bytes())
        data[7] ^= 1
        (p256_bundle / "model.onnx").write_bytes(bytes(data))
        expected: type[Exception] = errors.DigestMismatch
    elif attack == "extra file":
        (p256_bundle / "evil.sh").write_text("rm -rf /")
        expected = errors.UnexpectedFile
    elif attack == "missing file":
        (p256_bundle / "labels.txt").unlink()
        expected = errors.MissingFile
    else:
        other = generate_keypair("ecdsa-p256")
        sign_bundle(p256_bundle, FIELDS, ["model.onnx", "labels.txt"], other)
        pub = tmp_path / "other.pub.pem"
        pub.write_bytes(other.public.to_pem())
        expected = errors.UnknownKey
        # signed with another key: ours refuses it, and model_signing refuses it with the trusted key
        with pytest.raises(ValueError):
            model_signing_verify(p256_bundle, p256_keys.path / RELEASE_PUB_FILE)
    with pytest.raises(expected):
        verify_bundle(p256_bundle, trusted)
    if attack != "other key":
        with pytest.raises(ValueError, match=r"mismatch|Missing|Extra"):
            model_signing_verify(p256_bundle, pub)


def test_tampered_bundle_signature_is_refused(p256_bundle: Path, p256_keys: KeyDir) -> None:
    trusted = p256_keys.trust_root().release_keys
    doc = json.loads((p256_bundle / ENVELOPE_NAME).read_text())
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["predicate"]["edgefleet"]["hardware_ids"] = ["someone-elses-hw"]
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(errors.BadSignature):
        manifest_from_envelope(json.dumps(doc), trusted)
    for broken in ({**doc, "mediaType": "application/vnd.dev.sigstore.bundle+json;version=0.1"},
                   {k: v for k, v in doc.items() if k != "dsseEnvelope"}):  # fmt: skip
        with pytest.raises(errors.MalformedEnvelope):
            manifest_from_envelope(json.dumps(broken), trusted)


def _signed_statement(statement: dict[str, object], key: KeyPair) -> bytes:
    payload = json.dumps(statement).encode()
    return json.dumps(openssf.wrap(sign_envelope(payload, PAYLOAD_TYPE, [key]), key.public)).encode()


def test_a_release_key_cannot_sign_two_different_views(p256_bundle: Path, p256_keys: KeyDir) -> None:
    """Even validly signed, a statement whose third-party view (resources) and device view (edgefleet
    files) disagree is refused: both must always describe the same bytes."""
    key = p256_keys.key("release")
    trusted = p256_keys.trust_root().release_keys
    manifest = read_bundle(p256_bundle)
    good = openssf_statement_for(manifest)
    assert manifest_from_envelope(_signed_statement(good, key), trusted) == manifest

    def variant(change: str) -> dict[str, object]:
        s = json.loads(json.dumps(good))
        if change == "resource digest":
            s["predicate"]["resources"][0]["digest"] = "00" * 32
        elif change == "subject digest":
            s["subject"][0]["digest"]["sha256"] = "11" * 32
        elif change == "ignores the model":
            s["predicate"]["serialization"]["ignore_paths"] = ["model.onnx"]
        elif change == "blake2":
            s["predicate"]["serialization"]["hash_type"] = "blake2"
        elif change == "no edgefleet manifest":
            del s["predicate"]["edgefleet"]
        elif change == "two subjects":
            s["subject"] = [*s["subject"], *s["subject"]]
        return s

    for change in ("resource digest", "subject digest", "ignores the model", "blake2",
                   "no edgefleet manifest", "two subjects"):  # fmt: skip
        with pytest.raises(errors.MalformedEnvelope):
            manifest_from_envelope(_signed_statement(variant(change), key), trusted)
    assert good["_type"] == STATEMENT_TYPE


def test_ed25519_bundles_keep_the_bare_dsse_form(tmp_path: Path, keydir: KeyDir) -> None:
    """The default stays byte-compatible; model_signing cannot check Ed25519 keys (why P-256 exists)."""
    d = tmp_path / "b"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"x" * 100)
    sign_bundle(d, FIELDS, ["model.onnx"], keydir.key("release"))
    doc = json.loads((d / ENVELOPE_NAME).read_text())
    assert set(doc) == {"payloadType", "payload", "signatures"} and envelope_of(doc) == doc
    statement = json.loads(base64.b64decode(doc["payload"]))
    assert statement["predicateType"] == "https://edgefleet.dev/bundle-manifest/v1"
    assert verify_bundle(d, keydir.trust_root().release_keys).ref == "m:2"
    pub = tmp_path / "release.pub.pem"
    shutil.copy(keydir.path / RELEASE_PUB_FILE, pub)
    with pytest.raises((ValueError, AttributeError)):  # 1.1 trips over the key before reading the bundle
        model_signing_verify(d, pub)


def test_p256_release_key_signs_tuf_targets_that_python_tuf_verifies(p256_keys: KeyDir) -> None:
    root = p256_keys.tuf_root()
    release = p256_keys.key("release")
    custom = TargetCustom("m", 2, ["rpi4"])
    signed = sign_target_added(None, "models/m/2", sha256="ab" * 32, length=10, custom=custom,
                               release_keys=[release])  # fmt: skip
    md = verify_targets_update(root, None, signed)  # python-tuf's verify_delegate against the root
    assert md.signed.targets["models/m/2"].length == 10
    root_md = Metadata[Root].from_bytes(root)
    [keyid] = root_md.signed.roles[Targets.type].keyids
    assert (root_md.signed.keys[keyid].keytype, root_md.signed.keys[keyid].scheme) == ("ecdsa", ECDSA_P256)
    # a P-256 signature by another key, under the trusted key id, is refused
    forged = Metadata[Targets].from_bytes(signed)
    other = generate_keypair("ecdsa-p256")
    forged.signatures[keyid].signature = other.sign(forged.signed_bytes).hex()
    with pytest.raises(errors.MetadataUnsigned):
        verify_targets_update(root, None, forged.to_bytes())


def test_the_device_path_imports_no_sigstore_code() -> None:
    """The agent verifies the OpenSSF form with ``cryptography`` alone: no new device dependency."""
    # A device installs the `agent` extra, which has no boto3; securesystemslib (python-tuf's
    # signer library) imports boto3 for its AWS signer whenever it is installed, as the `s3` extra
    # of the server does here, and boto3 pulls in pyOpenSSL. Block boto3 as a device lacks it.
    code = "import device_agent.agent, device_agent.delivery, signing.manifest, signing.openssf"
    heavy = ("model_signing", "sigstore", "sigstore_models", "OpenSSL", "in_toto_attestation")
    assert imported_by(code, heavy, blocked=["boto3"]) == []

"""Key hierarchy: encrypted keys, k-of-n roots, rotation chains, revocation (library and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from signing import errors
from signing.dsse import sign_envelope
from signing.keyring import KeyDir, KeyDirError, init_keys, revoke_key, rotate_keys
from signing.keys import KeyLocked, KeyPair, WrongPassphrase, generate_keypair
from signing.trust import PAYLOAD_TYPE, TrustRoot, create_trust_root

PASS = b"correct horse battery"
runner = CliRunner()


def _text(result: object) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(str(getattr(result, "output", "")).split())


def _v1(kd: KeyDir) -> TrustRoot:
    return TrustRoot.load((kd.path / "roots" / "1.trust.json").read_bytes())


def test_keys_are_encrypted_with_the_passphrase(tmp_path: Path) -> None:
    init_keys(tmp_path / "k", passphrase=PASS)
    kd = KeyDir(tmp_path / "k")
    for name in ("root.key", "release.key", "fleet.key"):
        pem = (kd.path / name).read_bytes()
        assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert (kd.path / name).stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyLocked):
        kd.key("release")
    with pytest.raises(WrongPassphrase):
        kd.key("release", b"not it")
    assert kd.key("release", PASS).keyid in kd.trust_root().release_keys
    assert kd.encrypted


def test_unencrypted_keys_load_without_passphrase(keydir: KeyDir) -> None:
    assert keydir.key("fleet").keyid in keydir.trust_root().fleet_keys
    assert not keydir.encrypted


def test_k_of_n_root_and_rotation_needs_the_old_threshold(tmp_path: Path) -> None:
    trust = init_keys(tmp_path / "k", root_keys=3, root_threshold=2)
    kd = KeyDir(tmp_path / "k")
    assert (trust.root_threshold, len(trust.root_keys), len(kd.keys("root"))) == (2, 3, 3)
    # two root keys go offline elsewhere: one left here is not enough to sign v2
    for f in [f for f in kd.path.glob("root*.key")][:2]:
        f.rename(tmp_path / f.name)
    index = json.loads((kd.path / "keys.json").read_text())
    index["files"] = {k: v for k, v in index["files"].items() if (kd.path / k).exists()}
    (kd.path / "keys.json").write_text(json.dumps(index))
    with pytest.raises(KeyDirError, match="needs 2 root keys"):
        rotate_keys(kd, release=True)
    with pytest.raises(KeyDirError, match="threshold"):
        init_keys(tmp_path / "k2", root_keys=2, root_threshold=3)


def test_rotation_chain_is_followed_and_old_root_key_is_refused(keydir: KeyDir) -> None:
    pinned = _v1(keydir)
    old_root = keydir.key("root")
    rotate_keys(keydir, root_keys=3, root_threshold=2)
    rotate_keys(keydir, release=True, fleet=True)
    newest = pinned.follow(keydir.trust_chain(1))
    assert newest.version == 3 and newest.root_threshold == 2
    assert newest.release_keys == keydir.trust_root().release_keys
    assert old_root.keyid not in newest.root_keys
    # the retired root key alone signs a v4 handing the fleet to an attacker: refused
    evil = generate_keypair()
    forged = create_trust_root([evil], [evil.public], [evil.public], version=4, previous_root_keys=[old_root])
    with pytest.raises(errors.RootChainBroken):
        newest.verify_successor(forged.to_bytes())
    # ... and signed by the current root keys but skipping a version: refused too
    current = keydir.keys("root")
    skipping = create_trust_root(current, [evil.public], [evil.public], version=5, threshold=2)
    with pytest.raises(errors.RootChainBroken, match="expected trust root v4"):
        newest.verify_successor(skipping.to_bytes())


def test_new_root_must_also_meet_its_own_threshold(keydir: KeyDir) -> None:
    trust = keydir.trust_root()
    a, b = generate_keypair(), generate_keypair()
    # claims threshold 2 of {a, b} but only a (and the old root) signed it
    body = {
        "version": 2,
        "expires": trust.expires.isoformat(),
        "root_threshold": 2,
        "root_keys": [a.public.to_dict(), b.public.to_dict()],
        "release_keys": [k.to_dict() for k in trust.release_keys.values()],
        "fleet_keys": [k.to_dict() for k in trust.fleet_keys.values()],
    }
    env = sign_envelope(json.dumps(body).encode(), PAYLOAD_TYPE, [a, keydir.key("root")])
    with pytest.raises(errors.ThresholdNotMet):
        trust.verify_successor(env)


def test_revoke_release_key(keydir: KeyDir) -> None:
    old = keydir.key("release")
    trust = revoke_key(keydir, old.keyid[:10])
    assert old.keyid not in trust.release_keys and len(trust.release_keys) == 1
    assert keydir.key("release").keyid in trust.release_keys  # a fresh key replaced the last one
    assert old.keyid in keydir.index()["revoked"]
    assert (keydir.path / "retired" / f"release-{old.keyid[:12]}.key").exists()
    with pytest.raises(KeyDirError, match="rotate"):
        revoke_key(keydir, next(iter(trust.root_keys))[:10])
    with pytest.raises(KeyDirError, match="matches 0"):
        revoke_key(keydir, "ffffffffffffff")
    # a bundle signed by the revoked key is refused under the new root
    from signing.manifest import sign_bundle, verify_bundle

    bundle = keydir.path.parent / "b"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"m")
    fields = {"name": "m", "version": "1", "release": 1, "target": "arm64-cpu", "hardware_ids": ["x"]}
    sign_bundle(bundle, fields, ["model.onnx"], old)
    with pytest.raises(errors.UnknownKey):
        verify_bundle(bundle, keydir.trust_root().release_keys)


def test_fleet_key_alone_cannot_sign_a_bundle(keydir: KeyDir, tmp_path: Path) -> None:
    from signing.manifest import sign_bundle, verify_bundle

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.onnx").write_bytes(b"m")
    fields = {"name": "m", "version": "1", "release": 1, "target": "arm64-cpu", "hardware_ids": ["x"]}
    sign_bundle(tmp_path / "b", fields, ["model.onnx"], keydir.key("fleet"))
    with pytest.raises(errors.UnknownKey):
        verify_bundle(tmp_path / "b", keydir.trust_root().release_keys)


def test_keypair_rejects_non_key_files(tmp_path: Path) -> None:
    (tmp_path / "x.key").write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not a PEM private key"):
        KeyPair.load(tmp_path / "x.key")


# ---------------------------------------------------------------- CLI


def test_cli_refuses_unencrypted_keys_unless_asked(tmp_path: Path) -> None:
    d = str(tmp_path / "k")
    refused = runner.invoke(app, ["keys", "init", "--dir", d])
    assert refused.exit_code == 2 and "--insecure-no-passphrase" in _text(refused)
    assert not (tmp_path / "k" / "trust.json").exists()
    ok = runner.invoke(app, ["keys", "init", "--dir", d, "--insecure-no-passphrase", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["encrypted"] is False


def test_cli_init_rotate_revoke_show_with_passphrase(tmp_path: Path) -> None:
    d = str(tmp_path / "k")
    pf = tmp_path / "pass"
    pf.write_text("s3cret-passphrase\n")
    init = runner.invoke(
        app,
        [
            "keys",
            "init",
            "--dir",
            d,
            "--passphrase-file",
            str(pf),
            "--root-keys",
            "3",
            "--root-threshold",
            "2",
        ],
    )
    assert init.exit_code == 0, init.output
    assert KeyDir(tmp_path / "k").key("root", b"s3cret-passphrase")
    wrong = runner.invoke(
        app, ["keys", "rotate", "--dir", d, "--fleet"], env={"EDGEFLEET_KEY_PASSPHRASE": "nope-nope-nope"}
    )
    assert wrong.exit_code == 1 and "wrong passphrase" in _text(wrong)
    env = {"EDGEFLEET_KEY_PASSPHRASE": "s3cret-passphrase"}
    rotated = runner.invoke(app, ["keys", "rotate", "--dir", d, "--root-keys", "2", "--json"], env=env)
    assert rotated.exit_code == 0, rotated.output
    assert json.loads(rotated.stdout)["version"] == 2
    release = json.loads(rotated.stdout)["release_keys"][0]
    revoked = runner.invoke(app, ["keys", "revoke", release[:12], "--dir", d, "--json"], env=env)
    assert revoked.exit_code == 0, revoked.output
    shown = runner.invoke(app, ["keys", "show", "--dir", d, "--json"])
    info = json.loads(shown.stdout)
    assert info["version"] == 3 and info["revoked"] == [release] and info["encrypted"] is True
    nothing = runner.invoke(app, ["keys", "rotate", "--dir", d], env=env)
    assert nothing.exit_code == 2 and "nothing to rotate" in _text(nothing)


def test_cli_show_refuses_a_broken_chain(tmp_path: Path) -> None:
    d = tmp_path / "k"
    init_keys(d)
    rotate_keys(KeyDir(d), root_keys=1)
    # replace v2 by a root the v1 keys never signed
    evil = generate_keypair()
    (d / "roots" / "2.trust.json").write_bytes(
        create_trust_root([evil], [evil.public], [evil.public], version=2).to_bytes()
    )
    result = runner.invoke(app, ["keys", "show", "--dir", str(d)])
    assert result.exit_code == 1 and "not signed" in _text(result)

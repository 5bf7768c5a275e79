"""A key directory as written by ``edgefleet keys init`` and changed by ``keys rotate`` / ``keys revoke``.

Layout::

    root.key, root-<id>.key ...   root keys (k of n; offline in production)
    release.key ...                release keys (sign bundles and TUF targets; offline or CI)
    release.pub.pem                the primary release key's public half (for third-party verifiers)
    fleet.key                      the online fleet key (directives, TUF snapshot/timestamp)
    keys.json                      index: file -> role, key id, scheme, encrypted; revoked key ids
    trust.json                     current DSSE trust root (what directive/bundle checks read)
    root.json                      current TUF root metadata (same keys, same version)
    roots/N.trust.json, N.root.json  the whole chain, so a device pinned at any version can follow it
    retired/                       private keys rotated or revoked out (kept for audit, never trusted)

Private keys are PKCS#8 PEM, encrypted with the passphrase when one is given.
The library writes unencrypted keys when called without a passphrase (tests,
the demo); the CLI refuses that unless the user passes ``--insecure-no-passphrase``.
Root and fleet keys are Ed25519; release keys are Ed25519 or, with
``release_algorithm="ecdsa-p256"``, ECDSA P-256 (what OpenSSF ``model_signing``
verifies). A rotation or revocation replaces a release key with one of the same
algorithm unless told otherwise.

In production root and release keys live offline; the server needs only
``fleet.key``, ``trust.json`` and ``roots/`` (``SERVER_FILES``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from signing.keys import ED25519, KeyPair, PublicKey, generate_keypair, is_encrypted_pem, scheme_for
from signing.trust import TrustRoot, create_trust_root
from signing.tuf_repo import build_root

TRUST_FILE = "trust.json"
TUF_ROOT_FILE = "root.json"
INDEX_FILE = "keys.json"
ROOTS_DIR = "roots"
RETIRED_DIR = "retired"
RELEASE_PUB_FILE = "release.pub.pem"
ROLES = ("root", "release", "fleet")
# What the online server reads from a key directory, and nothing else: its own key, the
# DSSE trust root and the root chain it publishes. Root and release keys stay offline.
SERVER_FILES = ("fleet.key", TRUST_FILE, ROOTS_DIR)


class KeyDirError(ValueError):
    """The key directory cannot do what was asked (missing keys, unknown key id, bad threshold)."""


@dataclass(frozen=True)
class KeyDir:
    path: Path

    @property
    def trust_path(self) -> Path:
        return self.path / TRUST_FILE

    @property
    def tuf_root_path(self) -> Path:
        return self.path / TUF_ROOT_FILE

    def trust_root(self) -> TrustRoot:
        return TrustRoot.load_file(self.trust_path)

    def key(self, role: str, passphrase: bytes | None = None) -> KeyPair:
        """The primary key of ``role`` (``{role}.key``); encrypted keys need the passphrase."""
        return KeyPair.load(self.path / f"{role}.key", passphrase)

    def keys(self, role: str, passphrase: bytes | None = None) -> list[KeyPair]:
        """Every active private key of ``role`` held in this directory, primary first."""
        files = [f for f, e in self.index()["files"].items() if e["role"] == role]
        files.sort(key=lambda f: (f != f"{role}.key", f))
        return [KeyPair.load(self.path / f, passphrase) for f in files]

    def index(self) -> dict[str, Any]:
        """keys.json; a directory from before keys.json existed is indexed from its ``{role}.key`` files."""
        p = self.path / INDEX_FILE
        if p.exists():
            data: dict[str, Any] = json.loads(p.read_text())
            return data
        files: dict[str, Any] = {}
        for role in ROLES:
            f = self.path / f"{role}.key"
            if f.exists():
                data_pem = f.read_bytes()
                entry: dict[str, Any] = {"role": role, "encrypted": is_encrypted_pem(data_pem)}
                if not entry["encrypted"]:
                    entry["keyid"] = KeyPair.load(f).keyid
                files[f.name] = entry
        return {"files": files, "revoked": {}}

    @property
    def encrypted(self) -> bool:
        return any(e.get("encrypted") for e in self.index()["files"].values())

    def tuf_root(self, version: int | None = None) -> bytes:
        """TUF root metadata bytes: the current one, or version N of the chain."""
        if version is None:
            return self.tuf_root_path.read_bytes()
        return (self.path / ROOTS_DIR / f"{version}.root.json").read_bytes()

    def tuf_root_chain(self) -> list[bytes]:
        """TUF root metadata v1..vN, for publishing a repository devices pinned at any version can follow."""
        current = self.trust_root().version
        return [self.tuf_root(v) for v in range(1, current + 1)]

    def trust_chain(self, after_version: int) -> list[bytes]:
        """DSSE trust roots after ``after_version`` up to the current one, for ``TrustRoot.follow``."""
        current = self.trust_root().version
        versions = range(after_version + 1, current + 1)
        return [(self.path / ROOTS_DIR / f"{v}.trust.json").read_bytes() for v in versions]


def init_keys(
    path: Path,
    force: bool = False,
    *,
    passphrase: bytes | None = None,
    root_keys: int = 1,
    root_threshold: int = 1,
    expires: datetime | None = None,
    release_algorithm: str = ED25519,
) -> TrustRoot:
    """Generate root (k of n), release and fleet keys and version 1 of the trust root and TUF root.

    Without ``passphrase`` the private keys are written unencrypted: callers opt
    out explicitly by not giving one (the CLI demands ``--insecure-no-passphrase``).
    ``release_algorithm`` is ``ed25519`` or ``ecdsa-p256``.
    """
    path = Path(path)
    if (path / TRUST_FILE).exists() and not force:
        raise FileExistsError(f"{path / TRUST_FILE} exists; pass force to overwrite")
    if not 1 <= root_threshold <= root_keys:
        raise KeyDirError(f"root threshold {root_threshold} must be between 1 and {root_keys}")
    release_scheme = scheme_for(release_algorithm)
    path.mkdir(parents=True, exist_ok=True)
    roots = [generate_keypair() for _ in range(root_keys)]
    release, fleet = generate_keypair(release_scheme), generate_keypair()
    new_files = {_file_name("root", k, i == 0): (k, "root") for i, k in enumerate(roots)}
    new_files["release.key"] = (release, "release")
    new_files["fleet.key"] = (fleet, "fleet")
    index: dict[str, Any] = {"files": {}, "revoked": {}}
    return _write_version(
        KeyDir(path),
        index,
        version=1,
        root_kps=roots,
        previous_root_kps=[],
        threshold=root_threshold,
        release=[release.public],
        fleet=[fleet.public],
        new_files=new_files,
        retire=[],
        passphrase=passphrase,
        expires=expires,
    )


def rotate_keys(
    keydir: KeyDir,
    *,
    passphrase: bytes | None = None,
    root_keys: int | None = None,
    root_threshold: int | None = None,
    release: bool = False,
    fleet: bool = False,
    expires: datetime | None = None,
    release_algorithm: str | None = None,
) -> TrustRoot:
    """Publish trust root N+1: fresh root keys (``root_keys`` of them), release and/or fleet keys.

    N+1 is signed by the old root's threshold AND its own, so devices pinned at N
    follow it and nobody holding only the old keys can sign N+2. A fresh release
    key has ``release_algorithm``, by default the algorithm of the one it replaces.
    """
    old = keydir.trust_root()
    index = keydir.index()
    old_root_kps = _signing_root_keys(keydir, old, passphrase)
    new_files: dict[str, tuple[KeyPair, str]] = {}
    retire: list[str] = []
    if root_keys:
        roots = [generate_keypair() for _ in range(root_keys)]
        retire += [f for f, e in index["files"].items() if e["role"] == "root"]
        new_files.update({_file_name("root", k, i == 0): (k, "root") for i, k in enumerate(roots)})
    else:
        roots = old_root_kps
    threshold = root_threshold or min(old.root_threshold, len(roots))
    release_pubs = list(old.release_keys.values())
    fleet_pubs = list(old.fleet_keys.values())
    release_scheme = scheme_for(release_algorithm) if release_algorithm else _role_scheme(index, old)
    for role, wanted in (("release", release), ("fleet", fleet)):
        if wanted:
            fresh = generate_keypair(release_scheme if role == "release" else ED25519)
            retire += [f for f, e in index["files"].items() if e["role"] == role]
            new_files[f"{role}.key"] = (fresh, role)
            if role == "release":
                release_pubs = [fresh.public]
            else:
                fleet_pubs = [fresh.public]
    return _write_version(
        keydir,
        index,
        version=old.version + 1,
        root_kps=roots,
        previous_root_kps=old_root_kps,
        threshold=threshold,
        release=release_pubs,
        fleet=fleet_pubs,
        new_files=new_files,
        retire=retire,
        passphrase=passphrase,
        expires=expires,
    )


def revoke_key(keydir: KeyDir, keyid_prefix: str, *, passphrase: bytes | None = None) -> TrustRoot:
    """Publish trust root N+1 without a release or fleet key; a fresh key replaces it if it was the last.

    Root keys are not revoked one by one: rotate the root instead.
    """
    old = keydir.trust_root()
    index = keydir.index()
    matches = [
        (role, k)
        for role, keys in (("release", old.release_keys), ("fleet", old.fleet_keys))
        for k in keys
        if k.startswith(keyid_prefix)
    ]
    if any(k.startswith(keyid_prefix) for k in old.root_keys):
        raise KeyDirError("root keys are replaced with `keys rotate --root-keys N`, not revoked")
    if len(keyid_prefix) < 6 or len(matches) != 1:
        raise KeyDirError(
            f"key id prefix {keyid_prefix!r} matches {len(matches)} release/fleet keys; "
            "give at least 6 characters of exactly one"
        )
    role, keyid = matches[0]
    old_keys = {**old.release_keys, **old.fleet_keys}
    old_root_kps = _signing_root_keys(keydir, old, passphrase)
    keep = {
        "release": [k for i, k in old.release_keys.items() if i != keyid],
        "fleet": [k for i, k in old.fleet_keys.items() if i != keyid],
    }
    new_files: dict[str, tuple[KeyPair, str]] = {}
    retire = [f for f, e in index["files"].items() if e.get("keyid") == keyid]
    if not keep[role]:
        fresh = generate_keypair(old_keys[keyid].scheme)
        keep[role] = [fresh.public]
        new_files[f"{role}.key"] = (fresh, role)
    index["revoked"][keyid] = {"role": role}
    return _write_version(
        keydir,
        index,
        version=old.version + 1,
        root_kps=old_root_kps,
        previous_root_kps=old_root_kps,
        threshold=old.root_threshold,
        release=keep["release"],
        fleet=keep["fleet"],
        new_files=new_files,
        retire=retire,
        passphrase=passphrase,
        expires=None,
    )


def _signing_root_keys(keydir: KeyDir, trust: TrustRoot, passphrase: bytes | None) -> list[KeyPair]:
    held = [k for k in keydir.keys("root", passphrase) if k.keyid in trust.root_keys]
    if len(held) < trust.root_threshold:
        raise KeyDirError(
            f"signing trust root v{trust.version + 1} needs {trust.root_threshold} root keys "
            f"of v{trust.version}; {len(held)} are in {keydir.path}"
        )
    return held


def _role_scheme(index: dict[str, Any], trust: TrustRoot) -> str:
    """The scheme of the primary release key (``release.key``), so a rotation keeps the algorithm."""
    keys = trust.release_keys
    primary = index["files"].get("release.key", {}).get("keyid")
    if primary in keys:
        return keys[primary].scheme
    return next(iter(keys.values())).scheme if keys else ED25519


def _file_name(role: str, key: KeyPair, primary: bool) -> str:
    return f"{role}.key" if primary else f"{role}-{key.keyid[:12]}.key"


def _write_version(
    keydir: KeyDir,
    index: dict[str, Any],
    *,
    version: int,
    root_kps: list[KeyPair],
    previous_root_kps: list[KeyPair],
    threshold: int,
    release: list[PublicKey],
    fleet: list[PublicKey],
    new_files: dict[str, tuple[KeyPair, str]],
    retire: list[str],
    passphrase: bytes | None,
    expires: datetime | None,
) -> TrustRoot:
    """Sign version N of both root documents, then move key files and make N current (trust.json last)."""
    if not 1 <= threshold <= len(root_kps):
        raise KeyDirError(f"root threshold {threshold} must be between 1 and {len(root_kps)}")
    path = keydir.path
    trust = create_trust_root(
        root_kps, release, fleet, version=version, expires=expires, threshold=threshold,
        previous_root_keys=previous_root_kps,
    )  # fmt: skip
    tuf_root = build_root(
        version=version,
        root_keys=root_kps,
        root_threshold=threshold,
        release_keys=release,
        fleet_keys=fleet,
        previous_root_keys=previous_root_kps,
        expires=trust.expires,
    )
    (path / ROOTS_DIR).mkdir(parents=True, exist_ok=True)
    _atomic(path / ROOTS_DIR / f"{version}.trust.json", trust.to_bytes())
    _atomic(path / ROOTS_DIR / f"{version}.root.json", tuf_root)
    retired = path / RETIRED_DIR
    for name in retire:
        entry = index["files"].pop(name)
        if (path / name).exists():
            retired.mkdir(exist_ok=True, mode=0o700)
            os.replace(path / name, retired / f"{entry['role']}-{entry.get('keyid', 'unknown')[:12]}.key")
    for name, (kp, role) in new_files.items():
        kp.save(path / name, passphrase)
        index["files"][name] = {
            "role": role,
            "keyid": kp.keyid,
            "scheme": kp.scheme,
            "encrypted": bool(passphrase),
        }
    for role in ROLES:  # keep `{role}.key` the primary key of every role that still has one
        others = sorted(f for f, e in index["files"].items() if e["role"] == role)
        if others and f"{role}.key" not in others:
            os.replace(path / others[0], path / f"{role}.key")
            index["files"][f"{role}.key"] = index["files"].pop(others[0])
    _atomic(path / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True).encode())
    _write_release_pem(path, index, release)
    _atomic(path / TUF_ROOT_FILE, tuf_root)
    _atomic(path / TRUST_FILE, trust.to_bytes())
    return trust


def _write_release_pem(path: Path, index: dict[str, Any], release: list[PublicKey]) -> None:
    """``release.pub.pem``: the primary release key as SubjectPublicKeyInfo PEM.

    Third parties verify bundles with it (``model_signing verify key ... --public_key
    release.pub.pem``) without reading our trust root format.
    """
    by_id = {k.keyid: k for k in release}
    primary = by_id.get(index["files"].get("release.key", {}).get("keyid", ""))
    if primary is None and len(release) == 1:
        primary = release[0]
    if primary is not None:
        _atomic(path / RELEASE_PUB_FILE, primary.to_pem())


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

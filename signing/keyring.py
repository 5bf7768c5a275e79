"""A key directory as written by ``edgefleet keys init``.

Layout: ``root.key``, ``release.key``, ``fleet.key`` (PEM, owner-only) and
``trust.json`` (the root-signed trust root a device is provisioned with).
In production root.key and release.key live offline; the server only needs
``trust.json`` and ``fleet.key``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from signing.keys import KeyPair, generate_keypair
from signing.trust import TrustRoot, create_trust_root

TRUST_FILE = "trust.json"


@dataclass(frozen=True)
class KeyDir:
    path: Path

    @property
    def trust_path(self) -> Path:
        return self.path / TRUST_FILE

    def trust_root(self) -> TrustRoot:
        return TrustRoot.load_file(self.trust_path)

    def key(self, role: str) -> KeyPair:
        return KeyPair.load(self.path / f"{role}.key")


def init_keys(path: Path, force: bool = False) -> TrustRoot:
    """Generate root, release and fleet keys and the trust root signed by the root key."""
    path = Path(path)
    if (path / TRUST_FILE).exists() and not force:
        raise FileExistsError(f"{path / TRUST_FILE} exists; pass force to overwrite")
    path.mkdir(parents=True, exist_ok=True)
    root, release, fleet = generate_keypair(), generate_keypair(), generate_keypair()
    for role, key in (("root", root), ("release", release), ("fleet", fleet)):
        key.save(path / f"{role}.key")
    trust = create_trust_root([root], [release.public], [fleet.public])
    trust.save(path / TRUST_FILE)
    return trust

"""Trust primitives for edgefleet: keys, DSSE envelopes, bundle manifests, trust roots, delivery.

Depends on ``cryptography`` and, for the TUF delivery metadata
(``signing.tuf_repo``, ``signing.tuf_client``, ``signing.keyring``), on
``tuf``: a device verifies everything it installs without the server's or the
compiler's dependencies. See docs/trust.md.
"""

from signing.dsse import sign_envelope, verify_envelope
from signing.errors import TrustError
from signing.keys import KeyPair, PublicKey, generate_keypair
from signing.manifest import BundleManifest, FileEntry, read_bundle, sign_bundle, verify_bundle
from signing.trust import TrustRoot, create_trust_root

__all__ = [
    "BundleManifest",
    "FileEntry",
    "KeyPair",
    "PublicKey",
    "TrustError",
    "TrustRoot",
    "create_trust_root",
    "generate_keypair",
    "read_bundle",
    "sign_bundle",
    "sign_envelope",
    "verify_bundle",
    "verify_envelope",
]

"""The OpenSSF model-signing format: a Sigstore bundle (v0.3) around a DSSE envelope.

``model_signing verify key`` (OpenSSF model signing 1.x) accepts a bundle only in
this shape, so a release signed this way can be checked by anyone holding the
release public key, with no edgefleet code:

- the bundle: ``mediaType`` ``application/vnd.dev.sigstore.bundle.v0.3+json``,
  ``verificationMaterial.publicKey.hint`` naming the key (out-of-band key, no
  certificate, no transparency log entries) and ``dsseEnvelope``;
- the DSSE payload: an in-toto Statement v1 with predicate type
  ``https://model_signing/signature/v1.0``. Its ONE subject is the model with a
  digest over all file digests; the predicate lists every file under
  ``resources`` (name, algorithm, digest) and how they were hashed under
  ``serialization``;
- edgefleet's manifest (name, version, release counter, target, hardware ids,
  files with their lengths, io signature, quantization report, provenance)
  rides in the same predicate under ``edgefleet``: model-signing v1.0 verifiers
  ignore predicate fields they do not know.

One signature covers both views, so what a third party verifies and what a
device installs cannot disagree; :func:`edgefleet_manifest` refuses a statement
whose ``resources`` and subject digest do not match the edgefleet file list. The
DSSE signature carries edgefleet's key id, so the device checks it with the same
``signing.dsse.verify_envelope`` as a bare envelope: ``cryptography`` alone.

The shapes here follow the Sigstore bundle spec (protobuf-specs
``sigstore_bundle.proto``, JSON field names) and the model_signing 1.1 payload
as its verifier reads it; nothing of either library is imported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from signing.errors import MalformedEnvelope
from signing.keys import PublicKey

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
EDGEFLEET_FIELD = "edgefleet"
HASH_TYPE = "sha256"


def root_digest(digests: Sequence[str]) -> str:
    """The subject digest: SHA-256 over the raw resource digests, in the order they are listed."""
    h = hashlib.sha256()
    for digest in digests:
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def statement(
    subject_name: str,
    files: Sequence[tuple[str, str]],
    manifest: Mapping[str, Any],
    *,
    statement_type: str,
    ignore_paths: Sequence[str],
) -> dict[str, Any]:
    """The in-toto statement for ``files`` (``(name, sha256 hex)``), with our manifest in the predicate.

    Resources are sorted by name, as model_signing canonicalises its own manifests.
    ``ignore_paths`` are files in the bundle directory that are not part of the
    model (the signature itself): signed here, so a verifier's API call ignores
    them as its CLI does for the ``--signature`` file.
    """
    resources = [{"name": name, "algorithm": HASH_TYPE, "digest": digest} for name, digest in sorted(files)]
    return {
        "_type": statement_type,
        "subject": [
            {"name": subject_name, "digest": {"sha256": root_digest([r["digest"] for r in resources])}}
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": HASH_TYPE,
                "allow_symlinks": False,
                "ignore_paths": list(ignore_paths),
            },
            "resources": resources,
            EDGEFLEET_FIELD: dict(manifest),
        },
    }


def key_hint(key: PublicKey) -> str:
    """The public-key hint model_signing 1.x writes and checks: hex SHA-256 of the key's SPKI PEM.

    The bundle spec leaves the hint's format to signer and verifier; model_signing
    refuses a bundle whose hint does not match the key it is given, so we use its form.
    """
    return hashlib.sha256(key.to_pem()).hexdigest()


def wrap(envelope: Mapping[str, Any], key: PublicKey) -> dict[str, Any]:
    """A Sigstore bundle holding ``envelope``, verifiable with ``key`` delivered out of band."""
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_hint(key)},
            "tlogEntries": [],  # a private release key: no transparency log
        },
        "dsseEnvelope": dict(envelope),
    }


def is_bundle(document: Mapping[str, Any]) -> bool:
    return "dsseEnvelope" in document or "mediaType" in document


def unwrap(document: Mapping[str, Any]) -> Mapping[str, Any]:
    """The DSSE envelope inside a Sigstore bundle (raises MalformedEnvelope on any other shape)."""
    if document.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise MalformedEnvelope(
            f"Sigstore bundle media type {document.get('mediaType')!r}, expected {BUNDLE_MEDIA_TYPE!r}"
        )
    envelope = document.get("dsseEnvelope")
    if not isinstance(envelope, Mapping):
        raise MalformedEnvelope("Sigstore bundle holds no DSSE envelope")
    return envelope


def edgefleet_manifest(stmt: Mapping[str, Any], envelope_name: str) -> dict[str, Any]:
    """Our manifest from a verified model-signing statement, after checking both views agree.

    The ``resources`` must list exactly the manifest's files with the same
    SHA-256, the subject digest must be the digest over those resources, the
    hashing must be per-file SHA-256, and nothing but ``envelope_name`` may be
    ignored: otherwise a third-party verifier could accept bytes a device refuses.
    """
    try:
        predicate = stmt["predicate"]
        manifest = dict(predicate[EDGEFLEET_FIELD])
        resources = predicate["resources"]
        serialization = predicate["serialization"]
        listed = [(str(r["name"]), str(r["algorithm"]), str(r["digest"]).lower()) for r in resources]
        subjects = stmt["subject"]
        files = {str(f["path"]): str(f["sha256"]).lower() for f in manifest["files"]}
        ignored = [str(p) for p in serialization.get("ignore_paths", [])]
        subject_digest = str(subjects[0]["digest"]["sha256"]).lower() if len(subjects) == 1 else None
        computed = root_digest([d for _, _, d in listed])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise MalformedEnvelope(f"model-signing statement is malformed: {exc}") from exc
    if serialization.get("method") != "files" or serialization.get("hash_type") != HASH_TYPE:
        raise MalformedEnvelope("model-signing statement is not per-file SHA-256")
    if any(alg != HASH_TYPE for _, alg, _ in listed):
        raise MalformedEnvelope("model-signing resources must be SHA-256")
    if len({name for name, _, _ in listed}) != len(listed) or {n: d for n, _, d in listed} != files:
        raise MalformedEnvelope("model-signing resources disagree with the manifest's files")
    if subject_digest != computed:
        raise MalformedEnvelope("model-signing subject digest does not cover the listed resources")
    if any(p != envelope_name for p in ignored):
        raise MalformedEnvelope(f"model-signing statement ignores files other than {envelope_name}")
    return manifest

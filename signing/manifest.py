"""Bundle manifests signed as an in-toto statement inside a DSSE envelope.

A bundle on disk is a directory holding the model file(s) and
``bundle.dsse.json``. That file takes one of two forms, chosen by the release
key that signs it:

- Ed25519 (the default): a bare DSSE envelope whose statement lists the files
  as subjects (SHA-256) and carries our manifest (name, version, release
  counter, target, hardware ids, io signature, quantization report,
  provenance) as the predicate ``https://edgefleet.dev/bundle-manifest/v1``.
- ECDSA P-256: the OpenSSF model-signing format (``signing.openssf``), a
  Sigstore bundle whose DSSE statement has the model-signing predicate with our
  manifest inside it, so ``model_signing verify key`` accepts the directory.
  OpenSSF tools verify only NIST-curve keys, which is why Ed25519 bundles keep
  the bare form every existing device and tool already reads.

Both verify through the same DSSE check against the trusted release keys, with
``cryptography`` alone; readers accept either form (decision 0008).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from signing import openssf
from signing.dsse import sign_envelope, verify_envelope
from signing.errors import DigestMismatch, LengthMismatch, MalformedEnvelope, MissingFile, UnexpectedFile
from signing.hashing import file_digest
from signing.keys import ECDSA_P256, KeyPair, PublicKey
from signing.safejson import loads as safe_loads

ENVELOPE_NAME = "bundle.dsse.json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://edgefleet.dev/bundle-manifest/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    length: int


@dataclass(frozen=True)
class BundleManifest:
    """What a release key vouches for. ``files[0]`` is the model the runtime loads."""

    name: str
    version: str
    release: int
    target: str
    hardware_ids: list[str]
    files: list[FileEntry]
    io_signature: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def model_file(self) -> FileEntry:
        return self.files[0]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BundleManifest:
        try:
            files = [FileEntry(str(f["path"]), str(f["sha256"]), int(f["length"])) for f in data["files"]]
            if not files:
                raise ValueError("manifest lists no files")
            for f in files:
                if "/" in f.path or f.path.startswith(".") or f.path == ENVELOPE_NAME:
                    raise ValueError(f"illegal file name in manifest: {f.path!r}")
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                release=int(data["release"]),
                target=str(data["target"]),
                hardware_ids=[str(h) for h in data["hardware_ids"]],
                files=files,
                io_signature=dict(data.get("io_signature") or {}),
                quantization=dict(data.get("quantization") or {}),
                provenance=dict(data.get("provenance") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEnvelope(f"manifest is malformed: {exc}") from exc


def statement_for(manifest: BundleManifest) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f.path, "digest": {"sha256": f.sha256}} for f in manifest.files],
        "predicateType": PREDICATE_TYPE,
        "predicate": manifest.to_dict(),
    }


def openssf_statement_for(manifest: BundleManifest) -> dict[str, Any]:
    """The model-signing v1.0 statement: the files as resources, our manifest under ``edgefleet``."""
    return openssf.statement(
        manifest.ref,
        [(f.path, f.sha256) for f in manifest.files],
        manifest.to_dict(),
        statement_type=STATEMENT_TYPE,
        ignore_paths=[ENVELOPE_NAME],
    )


def sign_bundle(
    bundle_dir: Path, manifest_fields: Mapping[str, Any], model_files: list[str], key: KeyPair
) -> BundleManifest:
    """Hash ``model_files`` in ``bundle_dir``, build the manifest, and write the signed envelope.

    A P-256 key writes the OpenSSF model-signing form (a Sigstore bundle), an
    Ed25519 key the bare DSSE envelope (see the module docstring).
    """
    bundle_dir = Path(bundle_dir)
    files = []
    for name in model_files:
        digest, length = file_digest(bundle_dir / name)
        files.append(FileEntry(name, digest, length))
    manifest = BundleManifest.from_dict({**manifest_fields, "files": [asdict(f) for f in files]})
    document: dict[str, Any]
    if key.scheme == ECDSA_P256:
        payload = _canonical(openssf_statement_for(manifest))
        document = openssf.wrap(sign_envelope(payload, PAYLOAD_TYPE, [key]), key.public)
    else:
        document = sign_envelope(_canonical(statement_for(manifest)), PAYLOAD_TYPE, [key])
    (bundle_dir / ENVELOPE_NAME).write_text(json.dumps(document, indent=2))
    return manifest


def _canonical(statement: Mapping[str, Any]) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def _document(raw: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    """The envelope file as JSON (bounded: it comes from uploads and the network)."""
    if not isinstance(raw, (bytes, str)):
        return raw
    try:
        data = safe_loads(raw)
    except ValueError as exc:
        raise MalformedEnvelope(f"envelope is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedEnvelope("envelope is not a JSON object")
    return data


def envelope_of(raw: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    """The DSSE envelope of a bundle's signature file, in either form (bare, or in a Sigstore bundle)."""
    document = _document(raw)
    return openssf.unwrap(document) if openssf.is_bundle(document) else document


def _manifest_of(statement: Any) -> BundleManifest:
    """Parse a statement of either predicate type into a manifest (signature already checked)."""
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise MalformedEnvelope("not an in-toto statement")
    predicate_type = statement.get("predicateType")
    if predicate_type == openssf.PREDICATE_TYPE:
        return BundleManifest.from_dict(openssf.edgefleet_manifest(statement, ENVELOPE_NAME))
    if predicate_type != PREDICATE_TYPE:
        raise MalformedEnvelope("not an edgefleet bundle statement")
    try:
        manifest = BundleManifest.from_dict(statement["predicate"])
        subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedEnvelope(f"statement is malformed: {exc}") from exc
    if subjects != {f.path: f.sha256 for f in manifest.files}:
        raise MalformedEnvelope("statement subjects disagree with the manifest's files")
    return manifest


def manifest_from_envelope(
    raw: bytes | str | Mapping[str, Any], trusted: Mapping[str, PublicKey]
) -> BundleManifest:
    """Verify the envelope's signature against trusted release keys; return the manifest.

    ``raw`` is either form of ``bundle.dsse.json``. Also checks that the statement's
    subjects (or, in the OpenSSF form, its resources and subject digest) agree
    with the manifest's file list.
    """
    payload = verify_envelope(envelope_of(raw), PAYLOAD_TYPE, trusted)
    try:
        statement = safe_loads(payload)
    except ValueError as exc:
        raise MalformedEnvelope(f"statement is malformed: {exc}") from exc
    return _manifest_of(statement)


def verify_file(path: Path, entry: FileEntry) -> None:
    """Check one file against its signed entry, hashing it once (stops early if oversized)."""
    if not path.is_file():
        raise MissingFile(f"{entry.path} is missing")
    digest, length = file_digest(path, max_length=entry.length)
    if length != entry.length:
        raise LengthMismatch(f"{entry.path}: {length} bytes, signed {entry.length}")
    if digest != entry.sha256:
        raise DigestMismatch(f"{entry.path}: sha256 {digest[:12]}..., signed {entry.sha256[:12]}...")


def verify_bundle(bundle_dir: Path, trusted: Mapping[str, PublicKey]) -> BundleManifest:
    """Verify a bundle directory: signature by a trusted release key, then every file's hash and length."""
    bundle_dir = Path(bundle_dir)
    env_path = bundle_dir / ENVELOPE_NAME
    if not env_path.is_file():
        raise MissingFile(f"{ENVELOPE_NAME} is missing: the bundle is unsigned")
    manifest = manifest_from_envelope(env_path.read_bytes(), trusted)
    listed = {f.path for f in manifest.files} | {ENVELOPE_NAME}
    extra = sorted(p.name for p in bundle_dir.iterdir() if p.name not in listed)
    if extra:
        raise UnexpectedFile(f"files not in the signed manifest: {', '.join(extra)}")
    for entry in manifest.files:
        verify_file(bundle_dir / entry.path, entry)
    return manifest


def read_bundle(bundle_dir: Path) -> BundleManifest:
    """Read a bundle's manifest WITHOUT verifying its signature (for display and upload only)."""
    env = envelope_of((Path(bundle_dir) / ENVELOPE_NAME).read_bytes())
    try:
        statement = safe_loads(base64.b64decode(str(env["payload"])))
    except (KeyError, ValueError) as exc:
        raise MalformedEnvelope(f"envelope payload is malformed: {exc}") from exc
    return _manifest_of(statement)

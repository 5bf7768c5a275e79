"""One exception class per way a trust check can fail, and the roots they share.

Every class carries a ``code``: the reason a caller (agent, server, CLI) reports
upstream, so a refusal says exactly which check failed rather than "invalid
bundle". The device agent lists these strings in ``device_agent.wire.ReasonCode``.

Two roots under :class:`CodedError`, split as python-tuf splits them:
:class:`TrustError` is a verdict on content (never install it, never retry it),
:class:`Unavailable` says the content could not be fetched at all (retry later; it
says nothing about the content). A caller catches ``CodedError`` once to report
any of them by its code.
"""


class CodedError(Exception):
    """Root of every failure reported upstream by its reason ``code``."""

    code = "internal_error"


class TrustError(CodedError):
    """Something we were asked to trust failed a check."""

    code = "trust_error"


class Unavailable(CodedError):
    """What was to be checked could not be fetched (server away or busy, network down): no verdict."""

    code = "unavailable"


class MalformedEnvelope(TrustError):
    """The envelope or its payload is not well-formed JSON of the expected shape."""

    code = "malformed_envelope"


class WrongPayloadType(TrustError):
    """The envelope carries a payload of another type (e.g. a directive offered as a bundle)."""

    code = "wrong_payload_type"


class UnknownKey(TrustError):
    """No signature on the envelope was made by a key we trust for this role."""

    code = "unknown_key"


class BadSignature(TrustError):
    """A signature by a trusted key id does not verify: the payload was tampered with."""

    code = "bad_signature"


class ThresholdNotMet(TrustError):
    """Fewer distinct trusted keys signed than the role's threshold requires."""

    code = "threshold_not_met"


class DigestMismatch(TrustError):
    """A file's SHA-256 differs from the signed one."""

    code = "digest_mismatch"


class LengthMismatch(TrustError):
    """A file's length differs from the signed one (includes endless-data downloads)."""

    code = "length_mismatch"


class MissingFile(TrustError):
    """A file listed in the signed manifest is absent."""

    code = "missing_file"


class UnexpectedFile(TrustError):
    """The bundle holds a file the signed manifest does not list."""

    code = "unexpected_file"


class ExpiredMetadata(TrustError):
    """Signed metadata (directive, trust root) is past its expiry."""

    code = "expired"


class RootChainBroken(TrustError):
    """A new trust root is not version N+1 of the trusted one, or lacks the old or new root threshold."""

    code = "root_chain_broken"


# -- delivery (TUF) -------------------------------------------------------------
# python-tuf decides; these classes name its verdicts so a refusal says which rule held.


class DeliveryError(CodedError):
    """Something on the TUF delivery path failed: a verdict on metadata or a target (those
    classes are also TrustErrors) or the repository out of reach (``DeliveryUnavailable``)."""

    code = "delivery_error"


class MetadataUnsigned(DeliveryError, TrustError):
    """Metadata lacks its role's threshold of valid signatures (unsigned, unknown, revoked or wrong key)."""

    code = "metadata_unsigned"


class MetadataRollback(DeliveryError, TrustError):
    """Metadata older than what the device already trusts was offered (replay / rollback)."""

    code = "metadata_rollback"


class MetadataMixAndMatch(DeliveryError, TrustError):
    """Metadata is not the version that newer signed metadata pins (mix-and-match of versions)."""

    code = "metadata_mix_and_match"


class MetadataExpired(DeliveryError, ExpiredMetadata):
    """Delivery metadata is past its expiry (a freeze attack, or an offline repository)."""

    code = "metadata_expired"


class MetadataInvalid(DeliveryError, TrustError):
    """Delivery metadata is malformed or inconsistent in a way no finer class names."""

    code = "metadata_invalid"


class TargetNotFound(DeliveryError, TrustError):
    """The signed targets metadata does not list the requested target."""

    code = "target_not_found"


class TargetMismatch(DeliveryError, DigestMismatch):
    """The delivered target's hash or length differs from its signed target metadata (tampered)."""

    code = "target_mismatch"


class EndlessData(DeliveryError, LengthMismatch):
    """The server sent more bytes than the signed length allows (endless-data attack)."""

    code = "endless_data"


class DeliveryUnavailable(DeliveryError, Unavailable):
    """The repository could not be reached or answered with an HTTP error (not a verdict on content)."""

    code = "delivery_unavailable"


# -- agreement (Uptane director vs image repository) ----------------------------


class MalformedTargetInfo(DeliveryError, TrustError):
    """A target lacks the custom fields (hardware ids, release counter, family) edgefleet signs."""

    code = "malformed_target"


class DirectiveMismatch(TrustError):
    """The signed directive and the signed release metadata disagree on hash or length."""

    code = "directive_mismatch"


class HardwareMismatch(TrustError):
    """The release is not built for this device's hardware id."""

    code = "hardware_mismatch"


class RevokedRelease(TrustError):
    """The release counter is below the signed revocation floor of its model family."""

    code = "below_revocation_floor"

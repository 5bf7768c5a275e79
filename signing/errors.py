"""One exception class per way a trust check can fail.

Callers (agent, server, CLI) report the class name as the reason code, so every
refusal upstream says exactly which check failed rather than "invalid bundle".
"""


class TrustError(Exception):
    """Base class: something we were asked to trust failed a check."""

    code = "trust_error"


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

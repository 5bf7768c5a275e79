"""The reason codes on the wire: one enum, and every error class's ``code`` is in it."""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import signing.errors
from device_agent import downloader, protocol, runtime, wire

# The strings the fleet server and the tests match on: a value may be added, never changed.
ON_THE_WIRE = {
    "wrong_device",
    "stale_sequence",
    "expired",
    "malformed_directive",
    "trust_error",
    "malformed_envelope",
    "wrong_payload_type",
    "unknown_key",
    "bad_signature",
    "threshold_not_met",
    "digest_mismatch",
    "length_mismatch",
    "missing_file",
    "unexpected_file",
    "root_chain_broken",
    "delivery_error",
    "metadata_unsigned",
    "metadata_rollback",
    "metadata_mix_and_match",
    "metadata_expired",
    "metadata_invalid",
    "target_not_found",
    "target_mismatch",
    "endless_data",
    "delivery_unavailable",
    "malformed_target",
    "unavailable",
    "directive_mismatch",
    "hardware_mismatch",
    "below_revocation_floor",
    "unsupported_target",
    "no_repository",
    "insufficient_disk",
    "download_failed",
    "download_incomplete",
    "load_failed",
    "acceptance_failed",
    "disk_full",
    "io_error",
    "internal_error",
    "crash_loop",
    "error_rate",
    "latency_regression",
    "not_before",
    "maintenance_window",
    "deferred",
    "metered_link",
    "link_budget",
}


def test_the_enum_holds_exactly_the_wire_strings() -> None:
    assert {c.value for c in wire.ReasonCode} == ON_THE_WIRE
    assert protocol.ReasonCode is wire.ReasonCode
    assert wire.ReasonCode.STALE_SEQUENCE == "stale_sequence"  # a str: JSON and comparisons see the value


@pytest.mark.parametrize("module", [signing.errors, downloader, runtime], ids=lambda m: m.__name__)
def test_every_error_code_is_a_reason_code(module: ModuleType) -> None:
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    codes = {c.__name__: getattr(c, "code", None) for c in classes}
    coded = {name: code for name, code in codes.items() if isinstance(code, str)}
    assert coded, f"no error classes with a code in {module.__name__}"
    for name, code in coded.items():
        assert code in ON_THE_WIRE, f"{name}.code {code!r} is not a ReasonCode"

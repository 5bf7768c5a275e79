"""The selector's text form, ``hw=rpi4,site=lab``: one grammar for the CLI's ``--selector`` and
the device list's ``?selector=``.

Pure and light (``packaging`` only), so the CLI reads a selector without loading the server;
``fleet_server.selector`` tests devices against the dict it yields.
"""

from __future__ import annotations

from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet

HARDWARE_KEYS = ("hw", "hardware", "hardware_id")
AGENT_KEYS = ("agent", "agent_version")
TAG_KEY_MAX = 64  # as schemas.TagKey: a longer key can match no device
TAG_VALUE_MAX = 256
SYNTAX = (
    "comma-separated key=value: hw=<hardware id>, runtime=<name>, agent=<PEP 440 specifier>,"
    " any other key a tag"
)


class SelectorError(ValueError):
    """A selector text that cannot be read; the message names the part that is wrong."""


def parse_selector(text: str) -> dict[str, Any]:
    """``hw=rpi4,site=lab`` -> ``{"hardware_id": "rpi4", "tags": {"site": "lab"}}``.

    ``hw`` (or ``hardware``, ``hardware_id``) selects a hardware id, ``runtime`` a runtime the
    device reports, ``agent`` (or ``agent_version``) a PEP 440 specifier of the agent version
    (``agent=>=0.2``); every other key is a tag that must have that value. Empty text selects
    every device. A key given twice, a part without ``=``, or a bad specifier is refused.
    """
    result: dict[str, Any] = {}
    tags: dict[str, str] = {}
    seen: set[str] = set()
    for part in (p for p in text.split(",") if p):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SelectorError(f"{part!r} is not key=value ({SYNTAX})")
        if key in HARDWARE_KEYS:
            field = "hardware_id"
        elif key == "runtime":
            field = "runtime"
        elif key in AGENT_KEYS:
            field = "agent_version"
            check_agent_specifier(value)
        else:
            field = f"tags.{key}"
            if len(key) > TAG_KEY_MAX or len(value) > TAG_VALUE_MAX:
                raise SelectorError(
                    f"tag {key[:TAG_KEY_MAX]!r}: keys are at most {TAG_KEY_MAX} characters,"
                    f" values at most {TAG_VALUE_MAX}"
                )
        if field in seen:
            what = key if field.startswith("tags.") else f"{key}: the {field.replace('_', ' ')}"
            raise SelectorError(f"{what!r} is given twice" if what == key else f"{what} is given twice")
        seen.add(field)
        if field.startswith("tags."):
            tags[key] = value
        else:
            result[field] = value
    if tags:
        result["tags"] = tags
    return result


def check_agent_specifier(value: str) -> str:
    """``value`` if it is a PEP 440 specifier (the agent version criterion), else ``SelectorError``."""
    try:
        SpecifierSet(value)
    except InvalidSpecifier:
        raise SelectorError(f"agent version {value!r} is not a PEP 440 specifier like '>=0.2'") from None
    return value


__all__ = ["SYNTAX", "SelectorError", "check_agent_specifier", "parse_selector"]

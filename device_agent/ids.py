"""UUIDv7 inference ids (RFC 9562), minted on the device, cheap enough for every inference.

Layout (128 bits, most significant first): 48-bit Unix time in milliseconds, the
version (7), 12 bits ``rand_a``, the variant (``10``), 62 bits ``rand_b``. The 42
bits after the version (``rand_a`` and the top 30 of ``rand_b``) are a counter
(RFC 9562 section 6.2, method 1: a fixed-length dedicated counter) that starts at
a random value below 2**41 and goes up by one per id in this process; the low 32
bits are random for each id. So, in one process:

- ids are unique: two ids share a counter value only after 2**42 ids in between;
- ids sort in the order they were minted (sequentially, on any thread): the time
  never goes back (a wall clock stepped back is held at the last millisecond
  used) and within a millisecond the counter decides;
- minting takes no lock: ``next()`` on an ``itertools.count`` is atomic in CPython.

The low 32 bits come from :mod:`random` (not a CSPRNG): an id identifies an
inference, it is not a secret. Across devices a collision needs the same
millisecond, the same counter value and the same 32 random bits.

Ids are 128-bit ints on the hot path; :func:`format_id` turns one into the
canonical string only when something reads it (~1 us saved per inference).
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

_VERSION = 0x7 << 76
_VARIANT = 0b10 << 62
_COUNTER_BITS = 42
_RAND_A_SHIFT = 64  # the counter's top 12 bits sit above the variant
_time_ns = time.time_ns
_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class IdMinter:
    """Mints UUIDv7 ints from ``clock`` (seconds since the epoch: the device's wall clock; default
    ``time.time_ns``). The bits fixed within a millisecond are built once per millisecond, which
    halves the cost of an id (~0.5 us on a loaded 2-core VM)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self._counter = itertools.count(random.getrandbits(_COUNTER_BITS - 1))
        self._rand = random.getrandbits
        self._last_ms = -1
        self._prefix = 0

    def __call__(self) -> int:
        clock = self._clock
        ms = _time_ns() // 1_000_000 if clock is None else int(clock() * 1000)
        if ms > self._last_ms:  # a new millisecond; a wall clock stepped back keeps the last one
            self._last_ms = ms
            self._prefix = (ms & 0xFFFF_FFFF_FFFF) << 80 | _VERSION | _VARIANT
        c = next(self._counter)  # bits 30-41 go to rand_a, 0-29 to the top of rand_b
        return self._prefix | (c >> 30 & 0xFFF) << _RAND_A_SHIFT | (c & 0x3FFF_FFFF) << 32 | self._rand(32)


def format_id(value: int) -> str:
    """The canonical 8-4-4-4-12 lowercase hex form."""
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_id(text: object) -> int | None:
    """The 128-bit value of a canonical UUIDv7 string; None if ``text`` is not one."""
    if not isinstance(text, str) or len(text) != 36:
        return None
    text = text.lower()
    if not _ID_RE.match(text):
        return None
    return int(text.replace("-", ""), 16)


def id_millis(value: int) -> int:
    """The Unix time in milliseconds a UUIDv7 carries."""
    return value >> 80


def id_time(value: int) -> datetime:
    """When the inference with this id ran (the device's clock), as an aware UTC datetime."""
    return datetime.fromtimestamp(id_millis(value) / 1000, UTC)


__all__ = ["IdMinter", "format_id", "id_millis", "id_time", "parse_id"]

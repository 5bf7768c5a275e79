"""Redirecting the process's standard streams while other threads run.

``sys.stdout``, ``sys.stderr`` and file descriptor 2 exist once per process. A compile redirects
them for a while (``compiler.toolchain_notes`` points descriptor 2 at a file; the TFLite quantizer's
prints go to a buffer), and the compiler is also a library called from programs with threads of
their own (the demo's server and devices, a test worker). ``contextlib.redirect_stdout`` and its
kin put back whatever they found when they started: two of them on different threads, ending out
of order, leave the process writing into a finished redirect's buffer, or into a file already
closed, for the rest of its life. So here every redirect:

- holds ``STDIO_LOCK`` while it is in place (re-entrant: the quantizer's redirect runs inside
  the compile's own capture, on the same thread);
- puts the previous stream back only if its own is still in place: whoever replaced it since
  owns that slot now and will put back what they found;
- leaves open any stream that may still be put back or written to by someone else.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, TextIO

STDIO_LOCK = threading.RLock()

StreamName = Literal["stdout", "stderr"]


@contextmanager
def redirected(name: StreamName, stream: TextIO) -> Iterator[TextIO]:
    """``sys.<name>`` is ``stream`` for the duration, serialised with every other redirect here."""
    with STDIO_LOCK:
        previous = getattr(sys, name)
        setattr(sys, name, stream)
        try:
            yield stream
        finally:
            if getattr(sys, name) is stream:
                setattr(sys, name, previous)

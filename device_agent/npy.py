"""Reading ``.npy``/``.npz`` bytes from several threads at once without CPython's AST race.

numpy parses every array's header with ``ast.literal_eval``. On CPython 3.11 the AST
constructor's recursion-depth bookkeeping is shared by the interpreter's threads
(python/cpython gh-106905), and two threads parsing at once sometimes fail with
``SystemError: AST constructor recursion depth mismatch``. The agent reads arrays on
several threads (the acceptance check's golden set in a worker thread, the local API's
``.npy`` bodies on its server's threads); in a simulated fleet of a thousand agents in
one process it failed 2 of 10,000 acceptance checks of a good model. The headers are
small, so reading them one thread at a time costs nothing measurable.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator

import numpy as np

_HEADERS = threading.Lock()


@contextlib.contextmanager
def npz(data: bytes) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` of an ``.npz`` without pickles; its members are read under the lock too
    (each one's header is parsed when it is read), so read them inside the ``with``."""
    with _HEADERS, np.load(io.BytesIO(data), allow_pickle=False) as archive:
        yield archive


def array(data: bytes) -> np.ndarray:
    """One ``.npy`` array without pickles."""
    with _HEADERS:
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))


__all__ = ["array", "npz"]

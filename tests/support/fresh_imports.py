"""Which modules a piece of code imports, asked of a fresh interpreter.

A test process has imported nearly everything by the time it asks, so "does the agent need
pydantic?" can only be answered by a new one: run the code there, then look at ``sys.modules``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable


def imported_by(
    code: str, watched: Iterable[str], *, blocked: Iterable[str] = (), timeout: float = 120
) -> list[str]:
    """Which of ``watched`` (module names) are imported once ``code`` ran in a new interpreter, where
    the ``blocked`` modules cannot be imported (as on a device that lacks them). Fails the test, with
    the child's stderr, if the code does not run."""
    probe = "\n".join(
        [
            "import sys",
            *(f"sys.modules[{name!r}] = None" for name in blocked),
            code,
            f"print('\\n'.join(sorted(n for n in {sorted(watched)!r} if n in sys.modules)))",
        ]
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()

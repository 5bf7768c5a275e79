"""What the toolchain says while compiling, kept as the report's ``notes`` instead of on stderr.

onnxruntime (C++ logger and ``onnxruntime.quantization`` through the root
logger), LiteRT (``INFO: Created TensorFlow Lite XNNPACK delegate``), absl
(C++ ``W1206 ...] message`` lines) and Python warnings all write straight to
stderr, between the progress bar and the report, where a user cannot tell a
harmless remark from the reason a model was refused. During a compile they
are collected instead: log records by a root-logger handler, warnings by
``warnings.catch_warnings``, and everything native code writes to file
descriptor 2 by pointing that descriptor at a temporary file. ``sys.stderr``
is rebound to the real terminal meanwhile, so the caller's own output (the
CLI's progress bar) still shows. ``parse_stderr`` turns the captured text into
(level, source, message) rows; the report lists each distinct one with a count.

File descriptor 2 belongs to the process: while a compile runs, other threads'
native stderr is collected too (and lands in that compile's notes). Compiles
on several threads take turns (``compiler.std_streams.STDIO_LOCK``), so each
puts back what it found; an application that compiles on a thread and needs
its own stderr meanwhile should compile in a subprocess.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from compiler.std_streams import STDIO_LOCK

Note = tuple[str, str, str]  # level, source, message

_LEVELS = {"V": "debug", "I": "info", "W": "warning", "E": "error", "F": "fatal"}
# 2026-12-06 10:00:00.123456789 [W:onnxruntime:, graph.cc:123 Foo] message
_ORT = re.compile(r"^\S+ \S+ \[([VIWEF]):onnxruntime:[^\]]*?(?:, )?([\w./-]+:\d+)?[^\]]*\] (.*)$")
# W1206 10:00:00.123456  1234 file.cc:12] message   (absl / glog)
_ABSL = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w./-]+:\d+)\] (.*)$")
# INFO: Created TensorFlow Lite XNNPACK delegate for CPU.   (TFLite's own logger)
_TFLITE = re.compile(r"^(INFO|WARNING|ERROR): (.*)$")


def parse_stderr(text: str) -> list[Note]:
    """One (level, source, message) per non-empty line of captured native stderr."""
    notes: list[Note] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if m := _ORT.match(line):
            notes.append((_LEVELS[m.group(1)], "onnxruntime", m.group(3).strip()))
        elif m := _ABSL.match(line):
            notes.append((_LEVELS[m.group(1)], f"absl {m.group(2)}", m.group(3).strip()))
        elif m := _TFLITE.match(line):
            notes.append((m.group(1).lower(), "litert", m.group(2).strip()))
        else:
            notes.append(("output", "stderr", line))
    return notes


class Notes:
    """Distinct toolchain messages with how often each came."""

    def __init__(self) -> None:
        self.counts: Counter[Note] = Counter()

    def add(self, note: Note) -> None:
        self.counts[note] += 1

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"level": level, "source": source, "message": message, "count": n}
            for (level, source, message), n in self.counts.items()
        ]


class _Handler(logging.Handler):
    def __init__(self, notes: Notes) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.add((record.levelname.lower(), logger_source(record), record.getMessage()))


def logger_source(record: logging.LogRecord) -> str:
    """The logger's name; for the root logger, the module that called it (onnxruntime's gemm...)."""
    return record.name if record.name != "root" else _module_of(record.pathname)


def _module_of(filename: str) -> str:
    path = Path(filename).resolve()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and _resolved(file) == path:
            return name
    return path.name


def _resolved(file: str) -> Path:
    """``Path(file).resolve()``, remembered for absolute paths: a process can hold thousands of
    modules, and resolving each one's file (a stat per path component) again for every warning
    took ~0.3 s a warning in a test process."""
    return _resolved_absolute(file) if os.path.isabs(file) else Path(file).resolve()


@functools.cache
def _resolved_absolute(file: str) -> Path:
    return Path(file).resolve()


def _stderr_is_fd2() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


@contextmanager
def capture_toolchain() -> Iterator[Notes]:
    """Collect log records, warnings and native stderr into ``Notes`` for the duration.

    Serialised with every other redirect of the standard streams (``compiler.std_streams``): two
    compiles on two threads would otherwise each restore descriptor 2 and ``sys.stderr`` to what
    the other had put there."""
    with STDIO_LOCK:
        notes = Notes()
        handler = _Handler(notes)
        root = logging.getLogger()
        root.addHandler(handler)
        rebind = _stderr_is_fd2()
        original: TextIO | None = sys.stderr
        if original is not None:
            original.flush()
        saved = os.dup(2)
        sink = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
        terminal: TextIO | None = None
        os.dup2(sink.fileno(), 2)
        if rebind:
            terminal = open(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
            sys.stderr = terminal
        catcher = warnings.catch_warnings(record=True)
        caught = catcher.__enter__()
        warnings.simplefilter("default")
        try:
            yield notes
        finally:
            catcher.__exit__(None, None, None)
            for w in caught or []:
                notes.add(("warning", f"{w.category.__name__} {_module_of(w.filename)}", str(w.message)))
            root.removeHandler(handler)
            if terminal is not None:
                terminal.flush()
                if sys.stderr is terminal:
                    sys.stderr = original
                    terminal.close()
                # else someone replaced sys.stderr meanwhile and will put ``terminal`` back when
                # done: it must still write (to the real stderr) then, so it stays open, closed
                # with its last reference
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            logged = {message for _, _, message in notes.counts}
            for note in parse_stderr(sink.read().decode("utf-8", "replace")):
                if note[2] not in logged:  # a Python logger that also wrote to stderr is already counted
                    notes.add(note)
            sink.close()

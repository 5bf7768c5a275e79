"""A compile's redirects of the standard streams beside other threads (``compiler.std_streams``,
``compiler.toolchain_notes``): they take turns, and never leave the process writing into a closed
file or a finished redirect's buffer."""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from compiler.std_streams import redirected
from compiler.toolchain_notes import capture_toolchain


@contextmanager
def stderr_on_fd2() -> Iterator[None]:
    """``sys.stderr`` on descriptor 2 itself, as in a program run from a terminal (under pytest it is
    a capture file): then a compile rebinds ``sys.stderr`` to the real terminal while it runs. (Set
    in the test's body: pytest puts its capture file back between a fixture and the test.)"""
    saved = sys.stderr
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (closefd=False: nothing to leak)
    try:
        yield
    finally:
        sys.stderr = saved


def test_a_redirect_made_during_a_compile_and_ended_after_it_writes_to_a_live_stream() -> None:
    """Another thread's redirect that starts inside the compile's capture and ends after it puts
    back the compile's stand-in for stderr: that must still be writable then, and the compile must
    not have put its own stream back over the other's redirect."""
    theirs = io.StringIO()
    with stderr_on_fd2():
        with capture_toolchain():
            stand_in = sys.stderr
            previous, sys.stderr = sys.stderr, theirs  # their redirect begins (not through our lock)
        assert sys.stderr is theirs  # the compile left their redirect in place
        sys.stderr = previous  # their redirect ends: they put back what they found
        assert sys.stderr is stand_in
        print("after the compile", file=sys.stderr)  # old code: ValueError, I/O operation on closed file
        sys.stderr.flush()


def test_redirects_on_two_threads_take_turns_and_leave_the_stream_as_found() -> None:
    before = sys.stderr
    first_in, second_tried, release = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with redirected("stderr", io.StringIO()):
            order.append("first in")
            first_in.set()
            release.wait(10)
            order.append("first out")

    def second() -> None:
        first_in.wait(10)
        second_tried.set()
        with redirected("stderr", io.StringIO()):
            order.append("second in")
        order.append("second out")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    second_tried.wait(10)
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["first in", "first out", "second in", "second out"]
    assert sys.stderr is before


def test_a_compile_puts_descriptor_2_back() -> None:
    before = os.fstat(2)
    with capture_toolchain():
        assert os.fstat(2).st_ino != before.st_ino
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)

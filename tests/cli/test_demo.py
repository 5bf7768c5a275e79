"""`edgefleet demo` leaves nothing behind unless asked: its temporary work directory goes when it
passes, fails, is interrupted (Ctrl-C) or terminated; `--keep` keeps it and says where. Its summary
is tables of readable values."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from edgefleet.broker import mosquitto_binary
from edgefleet.demo import DemoResult, _print_summary, figure_rows, run_demo
from tests.support.waiting import exited_output, wait_for

EXE = str(Path(sys.executable).parent / "edgefleet")


@pytest.fixture
def tmpdir_of_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp directory, as this process sees it, is one of this test's."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path, for a child's TMPDIR: the server's ingest forkserver
    binds a Unix socket in it, and a path under a pytest-xdist worker's ``tmp_path`` plus the demo's
    own directories passes the 107 bytes such a socket's path may have."""
    path = Path(tempfile.mkdtemp(prefix="ef-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def demo_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("edgefleet-demo-*"))


@pytest.mark.slow
def test_a_failed_demo_removes_its_work_directory_unless_kept(
    tmpdir_of_the_demo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a real failure after keys, training and compiling: the broker cannot start
    monkeypatch.setenv("EDGEFLEET_BROKER", "no-such-broker")
    assert run_demo(devices=2, as_json=True) is False
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["workdir"] is None
    assert any("no-such-broker" in check for check in report["checks"])
    assert demo_dirs(tmpdir_of_the_demo) == []

    monkeypatch.setenv("COLUMNS", "200")
    assert run_demo(devices=2, keep=True) is False
    out = capsys.readouterr().out
    [kept] = demo_dirs(tmpdir_of_the_demo)
    assert f"work directory kept: {kept}" in out and "demo failed" in out
    assert (kept / "keys" / "trust.json").is_file() and (kept / "bundles" / "digits-1").is_dir()


def test_a_named_work_directory_is_the_callers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory the caller names stays, failed or not, with what it held."""
    (tmp_path / "keys").write_text("not a key directory")  # a real failure, at the first step
    assert run_demo(devices=1, workdir=tmp_path, as_json=True) is False
    report = json.loads(capsys.readouterr().out)
    assert report["workdir"] == str(tmp_path) and not report["ok"]
    assert (tmp_path / "keys").read_text() == "not a key directory"


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_an_interrupted_demo_removes_its_work_directory(short_tmp: Path, sig: signal.Signals) -> None:
    """Stopped while its broker, server and devices run: they stop, the directory goes."""
    tmp = short_tmp
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("EDGEFLEET_BROKER", None)
    # Started as from a terminal: SIGINT at its default and not blocked, whatever this test process
    # carries. A suite started as `make test &` from a shell without job control (a script, a CI
    # step) runs with SIGINT ignored; that passes through exec, Python then never raises
    # KeyboardInterrupt, and the demo, rightly ignoring Ctrl-C like any background job, runs to
    # its end. No test may change SIGINT or the signal mask (tests/conftest.py checks).
    parent_sigint = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    at_a_terminal = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", at_a_terminal, EXE, "demo", "--devices", "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: any((d / "devices").is_dir() for d in demo_dirs(tmp)),
            90,
            "the demo to start its fleet",
            interval=0.1,
            proc=proc,
            output=lambda: exited_output(proc),
        )
        [work] = demo_dirs(tmp)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, (err, parent_sigint)  # 130 after Ctrl-C, 143 after SIGTERM
    assert "Traceback" not in err, err
    assert not work.exists()
    mosquittos = subprocess.run(["pgrep", "-f", f"mosquitto -c {work}"], capture_output=True, text=True)
    assert mosquittos.stdout == "", "the demo's broker outlived it"


def test_the_summary_is_tables_of_readable_values(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = DemoResult(
        checks={"digits:1 rollout completed": True, "ran to the end (KeyError: ['x'])": False},
        figures={
            "fp32_accuracy": 0.9733,
            "int8_agreement": 1.0,
            "int8_snr_db": 39.6,
            "rollout_1_state": "completed",
            "rollout_1_seconds": 9.24,
            "decision": "error rate 1.000 over 26 inferences exceeds 0.05",
            "wall_seconds": 17.7,
            "extra": {"a": 1, "b": [1, 2]},
            "broker": None,
        },
    )
    rows = dict(figure_rows(result.figures))
    assert rows["float accuracy"] == "97.3%" and rows["int8 vs float: top-1 agreement"] == "100.0%"
    assert rows["int8 vs float: SNR"] == "39.6 dB" and rows["digits:1 rollout took"] == "9.2 s"
    assert rows["extra"] == "a: 1; b: 1, 2" and rows["broker"] == "-"
    monkeypatch.setenv("COLUMNS", "200")
    _print_summary(Console(), result, None)
    out = capsys.readouterr().out
    assert "ran to the end (KeyError: ['x'])" in out  # a check's name is text, not markup
    assert "work directory removed (--keep keeps it)" in out and "demo failed" in out

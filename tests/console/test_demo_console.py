"""``edgefleet demo --console``: after its checks the demo reports them, prints the console's
address and a token, and keeps the stack up until Ctrl-C (the stack itself is the demo's own,
tested in tests/cli/test_demo.py; here the demo's steps are replaced by a stand-in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgefleet import demo


class Server:
    url = "http://127.0.0.1:8123"
    admin_token = "ef_demo-token"


def test_the_console_stays_up_after_the_report_until_ctrl_c(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    events: list[str] = []

    def steps(work: Path, devices: int, console: Any, result: Any, linger: Any = None) -> None:
        result.checks["a check"] = True
        assert linger is not None
        linger(Server())
        events.append("stack torn down")  # after linger returns, as the demo's with-blocks unwind

    def ctrl_c(_seconds: float) -> None:
        events.append("waiting")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_run", steps)
    monkeypatch.setattr(demo.time, "sleep", ctrl_c)
    assert demo.run_demo(devices=1, workdir=tmp_path, console_ui=True) is True
    out = capsys.readouterr().out
    assert "web console: http://127.0.0.1:8123/ui/" in out
    assert "sign in with the admin token: ef_demo-token" in out
    assert out.index("a check") < out.index("web console:")  # the report comes first
    assert out.count("edgefleet demo") == 1  # and only once
    assert events == ["waiting", "stack torn down"]


def test_without_the_flag_the_demo_does_not_linger(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(demo, "_run", lambda *args: seen.append(args[4] if len(args) > 4 else None))
    demo.run_demo(devices=1, workdir=tmp_path)
    assert seen == [None]

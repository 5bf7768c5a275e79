"""The session cookie and CSRF tokens on their own: signed, expiring, tied to a key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from itsdangerous import TimestampSigner
from pydantic import SecretStr

from fleet_server.console.session import SessionCodec, SessionRefused, console_secret
from fleet_server.settings import ServerSettings

KEY = b"k" * 32


def test_a_cookie_reads_back_as_the_session_it_was_issued_for() -> None:
    codec = SessionCodec(KEY, 3600)
    value, session = codec.issue("ab" * 32)
    assert codec.read(value).token_hash == "ab" * 32 and codec.read(value).sid == session.sid
    assert codec.issue("ab" * 32)[1].sid != session.sid  # every sign-in is a session of its own


@pytest.mark.parametrize("tamper", ["flip", "other_key", "garbage", "empty"])
def test_a_forged_or_altered_cookie_is_refused(tamper: str) -> None:
    codec = SessionCodec(KEY, 3600)
    value, _ = codec.issue("ab" * 32)
    forged = {
        "flip": value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1],
        "other_key": SessionCodec(b"z" * 32, 3600).issue("ab" * 32)[0],
        "garbage": "not-a-cookie",
        "empty": "",
    }[tamper]
    with pytest.raises(SessionRefused, match="not valid here"):
        codec.read(forged)


def test_an_old_cookie_is_refused_as_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = SessionCodec(KEY, 60)
    with monkeypatch.context() as m:
        m.setattr(TimestampSigner, "get_timestamp", lambda self: int(time.time()) - 61)
        old, _ = codec.issue("ab" * 32)
    with pytest.raises(SessionRefused, match="expired"):
        codec.read(old)
    fresh, _ = codec.issue("ab" * 32)
    assert codec.read(fresh).token_hash == "ab" * 32


def test_csrf_tokens_belong_to_one_session_and_one_key() -> None:
    codec = SessionCodec(KEY, 3600)
    _, one = codec.issue("ab" * 32)
    _, two = codec.issue("ab" * 32)
    token = codec.csrf_token(one)
    assert codec.csrf_ok(one, token)
    assert not codec.csrf_ok(two, token)  # another sign-in of the same token
    assert not codec.csrf_ok(one, None) and not codec.csrf_ok(one, "")
    assert not SessionCodec(b"z" * 32, 3600).csrf_ok(one, token)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        SessionCodec(b"short", 60)


def test_the_generated_key_is_kept_private_and_reused(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path)
    first = console_secret(settings)
    assert console_secret(settings) == first and len(first) >= 32
    assert (tmp_path / "console.secret").stat().st_mode & 0o077 == 0
    configured = ServerSettings(data_dir=tmp_path, console_secret=SecretStr("c" * 40))
    assert console_secret(configured) == b"c" * 40

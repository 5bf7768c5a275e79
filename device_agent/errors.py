"""The agent's own errors.

Every failure the agent reports is a :class:`signing.errors.CodedError` carrying its
reason ``code`` (a :class:`device_agent.wire.ReasonCode` value), so it reports any of
them through one ``except``. (A runtime's ``RuntimeLoadError`` is the one exception:
:mod:`device_agent.runtime` imports without the signing stack, so the agent turns it
into an :class:`InstallError` with the same code where it loads a model.)
"""

from __future__ import annotations

from device_agent.wire import ReasonCode
from signing.errors import CodedError


class NoModelError(RuntimeError):
    """``infer`` was called before any model was installed."""


class InstallError(CodedError):
    """An accepted directive cannot be carried out on this device; ``code`` says why."""

    def __init__(self, code: ReasonCode | str, detail: str = "") -> None:
        super().__init__(detail or code)
        self.code = code


__all__ = ["CodedError", "InstallError", "NoModelError"]

"""API errors in the contract's shape: ``{"detail": {"code": "<snake_case>", "message": "..."}}``."""

from __future__ import annotations

from fastapi import HTTPException


class ApiError(HTTPException):
    def __init__(
        self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code, detail={"code": code, "message": message}, headers=headers)
        self.code = code

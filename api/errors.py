"""The application error that services raise; the exception handler renders it as a 4xx."""

from __future__ import annotations


class ApplicationError(Exception):
    """Bad input or a forbidden state change; ``status`` is the HTTP status to answer."""

    def __init__(
        self, message: str, *, extra: dict | None = None, status: int = 400, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra or {}
        self.status = status
        self.headers = headers or {}

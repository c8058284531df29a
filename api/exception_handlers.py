"""One error shape for every API error: ``{"message": ..., "extra": {...}}``."""

from __future__ import annotations

import errno

from django.conf import settings
from django.core.exceptions import (
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
)
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpResponse, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler

from api.errors import ApplicationError


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = _first_message(value)
            return inner if key in ("non_field_errors", "detail") else f"{key}: {inner}"
        return "invalid input"
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else "invalid input"
    return str(detail)


DATABASE_DOWN_MESSAGE = "the database is unavailable; retry in a few seconds"
DATABASE_RETRY_AFTER_SECONDS = 5


def database_unavailable(exc: BaseException) -> bool:
    """True for errors that mean the database cannot be reached (or dropped the connection), not a bad query."""
    return isinstance(exc, (OperationalError, InterfaceError))


def api_exception_handler(exc, context):
    if database_unavailable(exc):
        response = Response({"message": DATABASE_DOWN_MESSAGE, "extra": {}}, status=503)
        response["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response
    if isinstance(exc, ApplicationError):
        return Response({"message": exc.message, "extra": exc.extra}, status=exc.status, headers=exc.headers)
    if isinstance(exc, exceptions.Throttled):
        wait = max(1, round(exc.wait or 1))
        response = Response(
            {
                "message": f"too many write requests: at most {settings.API_WRITE_RATE} per user; retry in {wait} s",
                "extra": {"retry_after": wait},
            },
            status=429,
        )
        response["Retry-After"] = str(wait)
        return response
    if isinstance(exc, RequestDataTooBig):
        message = (
            f"request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes (upload files as multipart)"
        )
        return Response({"message": message, "extra": {}}, status=413)
    if isinstance(exc, SuspiciousOperation):
        return Response({"message": str(exc) or "bad request", "extra": {}}, status=400)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Response({"message": f"the server's storage is full: {exc.strerror}", "extra": {}}, status=507)
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(as_serializer_error(exc))
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    if isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        return None
    detail = response.data
    if isinstance(detail, dict) and set(detail) == {"detail"}:
        response.data = {"message": str(detail["detail"]), "extra": {}}
    else:
        response.data = {"message": _first_message(detail), "extra": {"fields": detail}}
    return response


class DatabaseUnavailableMiddleware:
    """503 instead of Django's HTML 500 page when the database is down, for every view.

    DRF views already answer through :func:`api_exception_handler`; this catches the
    rest (dashboard pages, and API requests that fail before a DRF view runs its
    handler): JSON in the API's error shape under ``/api/``, a short text page elsewhere.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exc):
        if not database_unavailable(exc):
            return None
        if request.path.startswith("/api/"):
            response = JsonResponse({"message": DATABASE_DOWN_MESSAGE, "extra": {}}, status=503)
        else:
            response = HttpResponse(
                f"503 Service Unavailable: {DATABASE_DOWN_MESSAGE}.\n",
                status=503,
                content_type="text/plain; charset=utf-8",
            )
        response["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response

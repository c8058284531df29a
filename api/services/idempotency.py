"""Idempotent creates: the same ``Idempotency-Key`` with the same request answers the first
response again instead of creating a second object.

A keyed request inserts its key row and runs inside one transaction, so a concurrent request
with the same key waits on the row's unique index until the first commits, then replays its
response (or, when the first failed and rolled back, runs itself). Only successful (2xx)
responses are kept: a request that failed leaves no key and runs again when retried. Keys
expire after ``IDEMPOTENCY_TTL`` (24 h), per user and per create (models, datasets, jobs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from api.errors import ApplicationError
from api.models import IdempotencyKey

IDEMPOTENCY_TTL = timedelta(hours=24)
HEADER = "Idempotency-Key"


def key_check(raw: str | None) -> str | None:
    """The header's key (None when absent), or a 400 naming what is wrong with it."""
    if raw is None:
        return None
    if not 1 <= len(raw) <= 255 or not all(33 <= ord(ch) <= 126 for ch in raw):
        raise ApplicationError(f"{HEADER} must be 1 to 255 visible ASCII characters (no spaces)")
    return raw


def fingerprint(data: Any) -> str:
    """sha256 of a request's parsed fields, uploaded files by their content (a retried multipart
    upload has another boundary but the same fingerprint)."""
    digest = hashlib.sha256()
    items = data.lists() if hasattr(data, "lists") else ((k, [v]) for k, v in dict(data).items())
    for name, values in sorted(items, key=lambda item: item[0]):
        digest.update(json.dumps(name).encode())
        for value in values:
            if hasattr(value, "chunks"):
                content = hashlib.sha256()
                for chunk in value.chunks():
                    content.update(chunk)
                value.seek(0)
                digest.update(b"file:" + content.hexdigest().encode())
            else:
                digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def idempotent_create(
    *, owner, scope: str, key: str | None, data: Any, create: Callable[[], tuple[int, Any]]
) -> tuple[int, Any, bool]:
    """Run ``create`` once per (owner, scope, key) and request body.

    Args:
        owner: the requesting user.
        scope: which create ("models", "datasets", "jobs").
        key: the client's key, or None (then ``create`` simply runs).
        data: the parsed request (fields and files) the key is bound to.
        create: makes the object; returns (HTTP status, JSON body).

    Returns:
        (status, body, replayed).

    Raises:
        ApplicationError: 422 when the key was used with another request body.
    """
    if key is None:
        return (*create(), False)
    mark = fingerprint(data)
    with transaction.atomic():
        IdempotencyKey.objects.filter(owner=owner, created__lt=timezone.now() - IDEMPOTENCY_TTL).delete()
        try:
            with transaction.atomic():
                row = IdempotencyKey.objects.create(
                    owner=owner, scope=scope, key=key, fingerprint=mark, status=0, body={}
                )
        except IntegrityError:  # the key is taken (a concurrent request with it has committed by now)
            row = IdempotencyKey.objects.get(owner=owner, scope=scope, key=key)
            if row.fingerprint != mark:
                raise ApplicationError(
                    f"{HEADER} {key!r} was already used with a different request; use a new key for a new request",
                    status=422,
                ) from None
            return row.status, row.body, True
        status, body = create()
        if not 200 <= status < 300:
            transaction.set_rollback(True)
            return status, body, False
        row.status, row.body = status, body
        row.save(update_fields=["status", "body"])
        return status, body, False

"""Webhooks: a job's resource POSTed to its ``callback_url`` when it ends (and on progress).

Each POST carries the job resource as JSON and three headers: ``X-Netdissect-Event``
(succeeded, failed, cancelled, progress), ``X-Netdissect-Delivery`` (a UUID, the same on every
attempt of one delivery: receivers dedupe on it, deliveries are at least once) and
``X-Netdissect-Signature: t=<unix time>,v1=<hex>`` where hex is HMAC-SHA256 under the job
owner's secret of ``"<t>." + body``. A delivery is tried until the receiver answers 2xx, at
most WEBHOOK_MAX_ATTEMPTS times, WEBHOOK_RETRY_SECONDS x 2^(attempt - 1) apart, on a Celery
queue; a worker's heartbeat sends again any delivery whose time has passed (a message lost
with a worker).

Outbound requests are guarded: the URL's host must resolve only to addresses that are not
loopback, private, link-local (the cloud metadata address among them), multicast, reserved or
unspecified, unless WEBHOOK_ALLOWED_NETWORKS (CIDRs) or WEBHOOK_ALLOWED_HOSTS (names) allow
it. The check runs at submission (a 400) and again before every attempt (DNS may change).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from api.errors import ApplicationError
from api.models import Job, WebhookDelivery, WebhookSecret
from api.services import queue

SIGNATURE_HEADER = "X-Netdissect-Signature"
EVENT_HEADER = "X-Netdissect-Event"
DELIVERY_HEADER = "X-Netdissect-Delivery"


def callback_url_check(url: str) -> str:
    """The URL if webhooks may be sent there, else a 400 naming the reason."""
    if len(url) > 2000:
        raise ApplicationError("callback_url must be at most 2000 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApplicationError(f"callback_url must be an http:// or https:// URL with a host, not {url!r}")
    reason = _refused(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    if reason:
        raise ApplicationError(f"callback_url {url!r} is refused: {reason}")
    return url


def _refused(host: str, port: int) -> str | None:
    """Why webhooks may not go to ``host`` (None: they may)."""
    if host.lower() in {h.lower() for h in settings.WEBHOOK_ALLOWED_HOSTS}:
        return None
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        return f"its host {host!r} does not resolve ({exc})"
    allowed = [ipaddress.ip_network(n, strict=False) for n in settings.WEBHOOK_ALLOWED_NETWORKS]
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if any(address in network for network in allowed):
            continue
        if (
            address.is_loopback
            or address.is_private
            or address.is_link_local
            or address.is_multicast
            or address.is_reserved
            or address.is_unspecified
        ):
            return (
                f"{host} resolves to {address}, a loopback, private, link-local or reserved address "
                "(WEBHOOK_ALLOWED_NETWORKS or WEBHOOK_ALLOWED_HOSTS can allow it)"
            )
    return None


def secret_of(user) -> str:
    """The user's webhook signing secret (made on first use)."""
    row, _ = WebhookSecret.objects.get_or_create(owner=user, defaults={"secret": secrets.token_hex(32)})
    return row.secret


def secret_rotate(user) -> str:
    """A new signing secret for the user (the old one stops verifying at once)."""
    row, _ = WebhookSecret.objects.update_or_create(owner=user, defaults={"secret": secrets.token_hex(32)})
    return row.secret


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for a body sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def delivery_create(*, job: Job, event: str) -> WebhookDelivery | None:
    """Record a delivery of the job resource as it is now, sent once the transaction commits."""
    if not job.callback_url:
        return None
    from api.serializers import JobSerializer

    delivery = WebhookDelivery.objects.create(
        job=job,
        delivery_id=uuid.uuid4(),
        event=event,
        url=job.callback_url,
        payload=JobSerializer(job).data,
        next_attempt=timezone.now(),
    )
    transaction.on_commit(lambda: queue.webhook_enqueue(delivery.pk))
    return delivery


def progress_crossed(job: Job, old: float, new: float) -> bool:
    """Whether a progress report from ``old`` to ``new`` crosses one of the job's callback steps."""
    step = job.callback_progress
    if not job.callback_url or not step:
        return False
    return int(new * 100 // step) > int(old * 100 // step) and new < 1.0


def delivery_attempt(*, delivery_pk: int) -> float | None:
    """Try one delivery once; returns the seconds until the next try, or None when it is done
    (delivered, given up, or not due: another attempt is already scheduled or running)."""
    with transaction.atomic():
        delivery = WebhookDelivery.objects.select_for_update(skip_locked=True).filter(pk=delivery_pk).first()
        if delivery is None or delivery.next_attempt is None:
            return None
        if delivery.next_attempt > timezone.now() + timedelta(seconds=1):
            return None  # not due: a duplicate message, or an attempt in flight
        # claim the attempt: a concurrent sweep or a duplicate message sees it scheduled later
        delivery.attempts += 1
        delivery.last_attempt = timezone.now()
        delivery.next_attempt = delivery.last_attempt + timedelta(seconds=settings.WEBHOOK_TIMEOUT_SECONDS + 30)
        delivery.save(update_fields=["attempts", "last_attempt", "next_attempt"])
        secret = secret_of(delivery.job.owner)
    code, error = _post(delivery, secret)
    delivered = code is not None and 200 <= code < 300
    retry = None
    if not delivered and delivery.attempts < settings.WEBHOOK_MAX_ATTEMPTS and not error.startswith("refused"):
        retry = settings.WEBHOOK_RETRY_SECONDS * 2 ** (delivery.attempts - 1)
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        status_code=code,
        error=error[:500],
        delivered=delivered,
        next_attempt=timezone.now() + timedelta(seconds=retry) if retry is not None else None,
    )
    return retry


def _post(delivery: WebhookDelivery, secret: str) -> tuple[int | None, str]:
    parts = urlsplit(delivery.url)
    reason = _refused(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    if reason:
        return None, f"refused: {reason}"
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    request = urllib.request.Request(
        delivery.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "netdissect-webhooks",
            EVENT_HEADER: delivery.event,
            DELIVERY_HEADER: str(delivery.delivery_id),
            SIGNATURE_HEADER: sign(secret, int(time.time()), body),
        },
    )
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=settings.WEBHOOK_TIMEOUT_SECONDS) as response:
            return response.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: they could lead past the address check."""

    def redirect_request(self, *args, **kwargs):
        return None


def deliveries_resend_due(*, older_than: timedelta) -> list[int]:
    """Send again the deliveries whose next attempt is overdue by ``older_than`` (their message
    was lost with a worker, or the broker was down). Returns their ids."""
    cutoff = timezone.now() - older_than
    due = list(WebhookDelivery.objects.filter(next_attempt__lt=cutoff).values_list("pk", flat=True)[:100])
    for pk in due:
        queue.webhook_enqueue(pk)
    return due

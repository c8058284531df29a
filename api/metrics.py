"""``GET /metrics``: the service in the Prometheus text format (prometheus_client).

- ``netdissect_http_request_duration_seconds{view, method, status}``: request latency, by
  route (the URL pattern's name), method and status; with several web processes
  (gunicorn) set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder they share (``make serve``
  and compose do).
- From the database and the broker at each scrape: ``netdissect_jobs{type, status}``,
  ``netdissect_queue_depth{queue}`` (messages waiting per Celery queue, Redis broker),
  ``netdissect_workers_alive``, ``netdissect_job_duration_seconds{type}`` (histogram of the
  succeeded jobs' run time), ``netdissect_shard_duration_seconds{stage}`` (finished shards)
  and ``netdissect_job_images_per_second{job, type}`` (running jobs).

Access: with ``METRICS_TOKEN`` set, only ``Authorization: Bearer <token>``; without it, only
clients on the loopback interface.
"""

from __future__ import annotations

import hmac
import os
import time
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

REQUEST_SECONDS = Histogram(
    "netdissect_http_request_duration_seconds",
    "HTTP request latency by route (URL pattern name), method and status",
    ["view", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
JOB_SECONDS_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
QUEUES = ("celery", "interactive")


class RequestMetricsMiddleware:
    """Observes every request's latency under its route name (``unmatched`` for none)."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        start = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        view = (match.view_name if match else "") or "unmatched"
        REQUEST_SECONDS.labels(view, request.method, str(response.status_code)).observe(time.perf_counter() - start)
        return response


class ServiceCollector:
    """Job, queue and worker figures, read from the database and the broker at scrape time."""

    def collect(self):
        from api.models import Job, JobShard, WorkerHeartbeat

        jobs = GaugeMetricFamily("netdissect_jobs", "Jobs by type and status", labels=["type", "status"])
        for type_, status, n in Job.objects.order_by().values_list("type", "status").annotate(n=Count("id")):
            jobs.add_metric([type_, status], n)
        yield jobs
        cutoff = timezone.now() - timedelta(seconds=settings.WORKER_ALIVE_SECONDS)
        yield GaugeMetricFamily(
            "netdissect_workers_alive",
            "Worker processes with a recent heartbeat",
            value=WorkerHeartbeat.objects.filter(last_seen__gte=cutoff).count(),
        )
        depth = _queue_depths()
        if depth is not None:
            queues = GaugeMetricFamily("netdissect_queue_depth", "Messages waiting per Celery queue", labels=["queue"])
            for name, n in depth.items():
                queues.add_metric([name], n)
            yield queues
        yield _durations(
            Job.objects.filter(status=Job.Status.SUCCEEDED),
            "netdissect_job_duration_seconds",
            "Run time of succeeded jobs (started to finished)",
            "type",
        )
        yield _durations(
            JobShard.objects.filter(status=JobShard.Status.DONE),
            "netdissect_shard_duration_seconds",
            "Run time of finished shards of sharded jobs (last attempt), by stage",
            "stage",
        )
        rates = GaugeMetricFamily(
            "netdissect_job_images_per_second", "Images per second of running jobs", labels=["job", "type"]
        )
        now = timezone.now()
        for pk, type_, done, started in Job.objects.filter(
            status=Job.Status.RUNNING, started__isnull=False
        ).values_list("pk", "type", "images_done", "started"):
            elapsed = (now - started).total_seconds()
            rates.add_metric([str(pk), type_], done / elapsed if elapsed > 0 else 0.0)
        yield rates


def _durations(rows, name: str, help_text: str, label: str) -> HistogramMetricFamily:
    """A histogram of (finished - started) over ``rows`` (a queryset), by the field ``label``."""
    duration = ExpressionWrapper(F("finished") - F("started"), output_field=DurationField())
    buckets = {f"le{b}": Count("id", filter=Q(d__lte=timedelta(seconds=b))) for b in JOB_SECONDS_BUCKETS}
    rows = (
        rows.filter(started__isnull=False, finished__isnull=False)
        .annotate(d=duration)
        .order_by()
        .values(label)
        .annotate(n=Count("id"), total=Sum("d"), **buckets)
    )
    family = HistogramMetricFamily(name, help_text, labels=[label])
    for row in rows:
        counts = [(str(float(b)), row[f"le{b}"]) for b in JOB_SECONDS_BUCKETS] + [("+Inf", row["n"])]
        family.add_metric([row[label]], counts, sum_value=row["total"].total_seconds() if row["total"] else 0.0)
    return family


def _queue_depths() -> dict[str, int] | None:
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        return {name: int(client.llen(name)) for name in QUEUES}
    except redis.RedisError:
        return None


_SERVICE = CollectorRegistry(auto_describe=False)
_SERVICE.register(ServiceCollector())


def metrics_view(request):
    """The metrics, to a client with the token (or on loopback when no token is configured)."""
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JsonResponse(
                {"message": "metrics need Authorization: Bearer <METRICS_TOKEN>", "extra": {}}, status=401
            )
    elif request.META.get("REMOTE_ADDR") not in ("127.0.0.1", "::1"):
        return JsonResponse(
            {"message": "metrics are served to loopback clients only unless METRICS_TOKEN is set", "extra": {}},
            status=403,
        )
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        requests = CollectorRegistry()
        multiprocess.MultiProcessCollector(requests)
    else:
        requests = REGISTRY
    body = generate_latest(requests) + generate_latest(_SERVICE)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)

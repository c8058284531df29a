"""Health: 200 with a live worker (its heartbeat rows are wiped between transactional tests and
rewritten within a second, hence the short wait), 503 without one."""

from __future__ import annotations

import pytest


@pytest.mark.django_db(transaction=True)
def test_health_counts_a_live_worker_process(client, celery_worker_process):
    import time

    deadline = time.monotonic() + 15
    response = client.get("/api/health/")
    while response.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        response = client.get("/api/health/")
    body = response.json()
    assert response.status_code == 200, body
    assert body["database"]["ok"] and body["database"]["engine"] == "postgresql"
    assert body["broker"]["ok"] and body["broker"]["transport"] == "redis"
    assert body["workers"]["alive"] >= 1


@pytest.mark.django_db
def test_health_is_503_without_a_live_worker(client, settings):
    from django.utils import timezone

    from api.models import WorkerHeartbeat

    now = timezone.now()
    WorkerHeartbeat.objects.create(hostname="stale@host", pid=1, started=now, last_seen=now)
    settings.WORKER_ALIVE_SECONDS = -3600
    response = client.get("/api/health/")
    assert response.status_code == 503
    assert response.json()["workers"] == {"ok": False, "alive": 0}

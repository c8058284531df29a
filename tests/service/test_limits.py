"""Per-user limits: API writes per minute and queued jobs, answered 429 with Retry-After in the
error shape; reads are not limited."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def _job(api, model_rows):
    model, dataset = model_rows
    return api.post("/api/jobs/", {"type": "dissect", "model": model.pk, "dataset": dataset.pk}, format="json")


def test_writes_over_the_rate_get_429_with_retry_after(api, other_api, model_rows, settings):
    from django.core.cache import cache

    cache.clear()
    settings.API_WRITE_RATE = "3/min"
    assert [_job(api, model_rows).status_code for _ in range(3)] == [202, 202, 202]
    limited = _job(api, model_rows)
    assert limited.status_code == 429
    body = limited.json()
    assert "at most 3/min" in body["message"] and body["extra"]["retry_after"] >= 1
    assert 1 <= int(limited["Retry-After"]) <= 60
    assert api.get("/api/jobs/").status_code == 200  # reads are free
    assert other_api.get("/api/jobs/").status_code == 200
    settings.API_WRITE_RATE = ""
    assert _job(api, model_rows).status_code == 202


def test_a_user_with_too_many_queued_jobs_gets_429(api, model_rows, settings):
    from api.models import Job

    settings.API_MAX_QUEUED_JOBS = 2
    assert [_job(api, model_rows).status_code for _ in range(2)] == [202, 202]
    capped = _job(api, model_rows)
    assert capped.status_code == 429 and capped["Retry-After"] == "30"
    assert "2 queued jobs" in capped.json()["message"] and capped.json()["extra"]["limit"] == 2
    Job.objects.filter(status="queued").update(status="running")  # they started: room again
    assert _job(api, model_rows).status_code == 202

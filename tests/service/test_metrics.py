"""GET /metrics: the Prometheus text format, parsed by prometheus_client's own parser; its job
figures move when a real worker runs a job; access needs the token or loopback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import register, wait_final
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]
ROOT = Path(__file__).resolve().parents[2]


def _scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_job_figures_move_when_a_job_runs(api, client, celery_worker_process, scenes, demo_weights):
    model, dataset = register(api, scenes, demo_weights)
    before = _scrape(client)
    assert _value(before, "netdissect_workers_alive") >= 1
    assert ("netdissect_queue_depth", (("queue", "celery"),)) in before
    response = api.post(
        "/api/jobs/",
        {
            "type": "dissect",
            "model": model["id"],
            "dataset": dataset["id"],
            "params": {"layers": ["conv5"], "shard_size": 12},  # 24 images: two shards per stage
        },
        format="json",
    )
    assert response.status_code == 202
    job = wait_final(api, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    after = _scrape(client)
    succeeded = _value(after, "netdissect_jobs", type="dissect", status="succeeded")
    assert succeeded == _value(before, "netdissect_jobs", type="dissect", status="succeeded") + 1
    assert _value(after, "netdissect_job_duration_seconds_count", type="dissect") == succeeded
    assert _value(after, "netdissect_job_duration_seconds_bucket", type="dissect", le="+Inf") == succeeded
    shards = _value(after, "netdissect_shard_duration_seconds_count", stage="count")
    assert shards == _value(before, "netdissect_shard_duration_seconds_count", stage="count") + 2
    # the API's own requests, by route and status
    created = _value(
        after, "netdissect_http_request_duration_seconds_count", view="job-list", method="POST", status="202"
    )
    assert created >= 1


def test_access_needs_the_token_or_loopback(client, settings):
    settings.METRICS_TOKEN = ""
    remote = client.get("/metrics", REMOTE_ADDR="10.1.2.3")
    assert remote.status_code == 403 and "METRICS_TOKEN" in remote.json()["message"]
    settings.METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer nope").status_code == 401
    samples = _scrape(client, HTTP_AUTHORIZATION="Bearer s3cret", REMOTE_ADDR="10.1.2.3")
    assert any(name == "netdissect_jobs" or name.startswith("netdissect_") for name, _ in samples)


def test_compose_gives_gunicorn_an_empty_shared_metrics_folder():
    api = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["api"]
    folder = api["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    command = " ".join(api["command"])
    emptied = re.search(rf"rm -rf {re.escape(folder)} && mkdir -p {re.escape(folder)} && gunicorn", command)
    assert emptied, command

"""Workers under faults: killed mid-shard, cancelled, Redis restarted, Postgres connections dropped.

All with real worker processes, the real Redis and the real Postgres.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time

import numpy as np
import pytest
from conftest import register, wait_final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]


def _submit(api, model, dataset, **params) -> int:
    response = api.post(
        "/api/jobs/",
        {"type": "dissect", "model": model["id"], "dataset": dataset["id"], "params": params},
        format="json",
    )
    assert response.status_code == 202, response.json()
    return response.json()["id"]


def _matrix(api, job_id: int, layer: str) -> dict[str, np.ndarray]:
    response = api.get(f"/api/jobs/{job_id}/matrix/?layer={layer}&as=npz")
    with np.load(io.BytesIO(b"".join(response.streaming_content))) as data:
        return {key: data[key] for key in ("iou", "thresholds")}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sharded_and_unsharded_runs_agree_exactly(api, celery_worker_process, scenes, demo_weights):
    from api.models import JobShard

    model, dataset = register(api, scenes, demo_weights)
    layers = ["conv4.0", "conv5.0"]
    whole = wait_final(api, _submit(api, model, dataset, layers=layers))
    sharded = wait_final(api, _submit(api, model, dataset, layers=layers, shard_size=5))
    assert whole["status"] == sharded["status"] == "succeeded", (whole["error"], sharded["error"])
    shards = JobShard.objects.filter(job_id=sharded["id"])
    assert shards.filter(stage="quantile").count() == 5 and shards.filter(stage="count").count() == 5
    assert not JobShard.objects.filter(job_id=whole["id"]).exists()
    for layer in layers:
        a, b = _matrix(api, whole["id"], layer), _matrix(api, sharded["id"], layer)
        assert np.array_equal(a["thresholds"], b["thresholds"])
        assert np.array_equal(a["iou"], b["iou"])


def test_a_worker_killed_mid_shard_is_replaced_and_results_are_written_once(api, worker_pool, resnet):
    from api.models import JobShard, Unit, UnitConcept

    worker_pool.ensure(2)
    model, dataset = resnet
    job_id = _submit(api, model, dataset, layers=["layer4"], shard_size=40, top_k_images=0)
    shard = _wait_for(
        lambda: JobShard.objects.filter(job_id=job_id, status="running", images_done__gt=0).first(),
        120,
        "a shard to be running",
    )
    worker_pool.kill(shard.worker)
    job = wait_final(api, job_id, timeout=400)
    assert job["status"] == "succeeded", job["error"]
    shard.refresh_from_db()
    assert shard.attempts >= 2 and shard.status == "done"
    assert Unit.objects.filter(job_id=job_id).count() == 512
    assert UnitConcept.objects.filter(unit__job_id=job_id).count() == 512 * 5


def test_cancel_stops_a_running_job_within_seconds(api, worker_pool, resnet):
    from api.models import Unit

    worker_pool.ensure(1)
    worker_pool.shrink(1)
    model, dataset = resnet
    job_id = _submit(api, model, dataset, layers=["layer4"], shard_size=10_000, top_k_images=0)
    _wait_for(lambda: api.get(f"/api/jobs/{job_id}/").json()["images_done"] > 0, 120, "the job to make progress")
    cancelled_at = time.monotonic()
    response = api.post(f"/api/jobs/{job_id}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    model2, dataset2 = model, dataset
    quick = _submit(api, model2, dataset2, layers=["layer1"], max_images=4, top_k_images=0)
    assert wait_final(api, quick, timeout=60)["status"] == "succeeded"
    assert time.monotonic() - cancelled_at < 30
    job = api.get(f"/api/jobs/{job_id}/").json()
    assert job["status"] == "cancelled"
    assert not Unit.objects.filter(job_id=job_id).exists()


def _restart_redis() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=30)
    time.sleep(1.0)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    _wait_for(
        lambda: subprocess.run(["redis-cli", "ping"], capture_output=True, text=True).stdout.strip() == "PONG",
        30,
        "redis to come back",
    )


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a local redis-server to restart")
def test_a_redis_restart_delays_a_job_but_does_not_lose_it(api, worker_pool, resnet):
    worker_pool.ensure(1)
    model, dataset = resnet
    job_id = _submit(api, model, dataset, layers=["layer4"], shard_size=40, top_k_images=0)
    _wait_for(lambda: api.get(f"/api/jobs/{job_id}/").json()["images_done"] > 0, 120, "the job to make progress")
    _restart_redis()
    job = wait_final(api, job_id, timeout=400)
    assert job["status"] == "succeeded", job["error"]


def test_dropped_postgres_connections_delay_a_job_but_do_not_lose_it(api, worker_pool, resnet):
    from django.db import connection

    worker_pool.ensure(1)
    model, dataset = resnet
    job_id = _submit(api, model, dataset, layers=["layer4"], shard_size=40, top_k_images=0)
    _wait_for(lambda: api.get(f"/api/jobs/{job_id}/").json()["images_done"] > 0, 120, "the job to make progress")
    name = connection.settings_dict["NAME"]
    for _ in range(3):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
        time.sleep(1.0)
    job = wait_final(api, job_id, timeout=400)
    assert job["status"] == "succeeded", job["error"]

"""Idempotency-Key on POST /api/jobs/, /api/models/ and /api/datasets/: a retry answers the first
response, another body with the same key is a 422, concurrent requests with one key create one object."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _no_enqueue(monkeypatch):
    """The jobs here are never sent: the suite's live workers would run (and fail) them while
    the test's database is being flushed, and the two deadlock."""
    from api.services import queue

    monkeypatch.setattr(queue, "job_enqueue", lambda job_id: None)


def _job(api, model_rows, key: str | None, quantile: float = 0.99):
    model, dataset = model_rows
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    body = {"type": "dissect", "model": model.pk, "dataset": dataset.pk, "params": {"quantile": quantile}}
    return api.post("/api/jobs/", body, format="json", **headers)


def test_a_retry_answers_the_first_response(api, model_rows):
    from api.models import Job

    first = _job(api, model_rows, "retry-1")
    again = _job(api, model_rows, "retry-1")
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert Job.objects.count() == 1
    assert _job(api, model_rows, None).status_code == _job(api, model_rows, None).status_code == 202
    assert Job.objects.count() == 3  # no key: every POST creates


def test_the_same_key_with_another_body_is_a_422(api, model_rows):
    assert _job(api, model_rows, "k-2").status_code == 202
    other = _job(api, model_rows, "k-2", quantile=0.995)
    assert other.status_code == 422 and "k-2" in other.json()["message"]


def test_bad_keys_and_failed_requests(api, model_rows):
    from api.models import Job

    for bad in ("has space", "x" * 256, "é"):
        response = _job(api, model_rows, bad)
        assert response.status_code == 400 and "Idempotency-Key" in response.json()["message"], bad
    failed = _job(api, model_rows, "k-3", quantile=2.0)
    assert failed.status_code == 400
    # a failed request is not remembered: the corrected retry with the same key runs
    assert _job(api, model_rows, "k-3").status_code == 202 and Job.objects.count() == 1


def test_keys_are_per_user_and_per_kind_of_create(api, other_api, model_rows, data_root):
    from api.models import Dataset, Job

    assert _job(api, model_rows, "shared").status_code == 202
    path = data_root / "idem-scenes"
    if not (path / "index.csv").exists():
        from dissect_core.synthetic import generate

        generate(path, n_images=4, seed=1)
    body = {"name": "s", "format": "synthetic", "path": str(path)}
    made = api.post("/api/datasets/", body, format="json", HTTP_IDEMPOTENCY_KEY="shared")
    assert made.status_code == 201
    again = api.post("/api/datasets/", body, format="json", HTTP_IDEMPOTENCY_KEY="shared")
    assert again.json()["id"] == made.json()["id"]
    theirs = other_api.post("/api/datasets/", body, format="json", HTTP_IDEMPOTENCY_KEY="shared")
    assert theirs.status_code == 201 and theirs.json()["id"] != made.json()["id"]
    assert Dataset.objects.filter(name="s").count() == 2 and Job.objects.count() == 1


def test_model_uploads_are_matched_by_their_content(api, data_root, demo_weights):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from api.models import NetworkModel

    weights, num_classes = demo_weights
    content = weights.read_bytes()

    def post(data: bytes):
        upload = SimpleUploadedFile("w.safetensors", data)
        fields = {"name": "up", "arch": "builtin:scenecnn", "num_classes": num_classes, "input_size": 64}
        return api.post("/api/models/", {**fields, "weights": upload}, HTTP_IDEMPOTENCY_KEY="upload-1")

    first = post(content)
    assert first.status_code == 201, first.json()
    assert post(content).json()["id"] == first.json()["id"]
    assert post(content[:-1] + b" ").status_code == 422
    assert NetworkModel.objects.filter(name="up").count() == 1


def test_keys_expire_after_a_day(api, model_rows):
    from api.models import IdempotencyKey, Job

    assert _job(api, model_rows, "old").status_code == 202
    IdempotencyKey.objects.update(created=IdempotencyKey.objects.get().created - timedelta(hours=25))
    assert _job(api, model_rows, "old").status_code == 202 and Job.objects.count() == 2


def test_concurrent_requests_with_one_key_create_one_job(user, model_rows):
    from django.db import connection
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    from api.models import Job

    token = Token.objects.get_or_create(user=user)[0].key
    answers: list = []
    start = threading.Barrier(4)

    def post():
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        start.wait()
        try:
            answers.append(_job(client, model_rows, "race-1"))
        finally:
            connection.close()

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [a.status_code for a in answers] == [202] * 4
    assert len({a.json()["id"] for a in answers}) == 1
    assert Job.objects.count() == 1
    assert sum(a.has_header("Idempotent-Replayed") for a in answers) == 3

"""Regression tests for what the reliability campaign found (each was a 500 or a stuck job)."""

from __future__ import annotations

import errno
import io
import json
from datetime import timedelta

import pytest

pytestmark = pytest.mark.django_db


def _error(response, status: int) -> str:
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"message", "extra"}, body
    return body["message"]


def test_archives_broken_inside_are_400(api, settings, tmp_path):
    from bench.campaign.hostile import _PNG, _lying_zip, _tar, _tar_member

    settings.MEDIA_ROOT = tmp_path
    cut = _tar(_tar_member("images/b.png", _PNG * 50))
    for name, data in (("liar.zip", _lying_zip()), ("cut.tar.gz", cut[: len(cut) * 2 // 3])):
        archive = io.BytesIO(data)
        archive.name = name
        response = api.post(
            "/api/datasets/", {"name": "d", "format": "imagefolder", "archive": archive}, format="multipart"
        )
        assert "not a valid" in _error(response, 400)
    assert not [p for p in (tmp_path / "uploads").rglob("*") if p.is_file()]


def test_json_too_deep_or_too_big_gets_the_error_shape(api):
    deep = '{"params": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert "nested too deeply" in _error(api.generic("POST", "/api/jobs/", deep, "application/json"), 400)
    big = json.dumps({"type": "dissect", "pad": "x" * (11 << 20)})
    assert "larger than" in _error(api.generic("POST", "/api/jobs/", big, "application/json"), 413)


def test_malformed_ids_and_huge_pages_are_not_500(api):
    assert api.post("/api/jobs/null,null/cancel/").status_code == 404
    assert api.get("/api/datasets/?limit=9223372036854775808").status_code == 200
    assert api.get("/api/models/?offset=9223372036854775808").status_code == 200


def test_a_full_disk_is_507(api, monkeypatch):
    from api.services import registration

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registration, "save_upload", full)
    weights = io.BytesIO(b"\0" * 64)
    weights.name = "w.safetensors"
    response = api.post(
        "/api/models/", {"name": "m", "arch": "builtin:scenecnn", "weights": weights}, format="multipart"
    )
    assert "storage is full" in _error(response, 507)


@pytest.fixture()
def rows(user):
    from api.models import Dataset, NetworkModel

    layers = [{"name": "conv5", "type": "Conv2d", "units": 8, "height": 4, "width": 4}]
    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x", layers=layers)
    dataset = Dataset.objects.create(owner=user, name="d", format="broden", path="/y")
    return model, dataset


def test_a_job_created_while_the_broker_is_down_is_accepted_and_sent_again(
    api, rows, monkeypatch, django_capture_on_commit_callbacks
):
    from django.utils import timezone
    from kombu.exceptions import OperationalError

    from api import services
    from api.models import Job
    from api.services import queue

    sent: list[int] = []

    def down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(queue.app, "send_task", down)
    model, dataset = rows
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/jobs/", {"type": "dissect", "model": model.pk, "dataset": dataset.pk}, format="json")
    assert response.status_code == 202, response.json()
    job = Job.objects.get(pk=response.json()["id"])
    assert job.status == "queued"

    monkeypatch.setattr(queue.app, "send_task", lambda name, kwargs: sent.append(kwargs["job_id"]))
    stale = timedelta(seconds=30)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.jobs_requeue_lost(older_than=stale) == []  # too young
    created = timezone.now() - timedelta(seconds=40)
    Job.objects.filter(pk=job.pk).update(created=created)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.jobs_requeue_lost(older_than=stale) == [job.pk]
    assert sent == [job.pk]
    # Sent at age 40 s: the next send waits until the job is twice as old, not one per sweep.
    Job.objects.filter(pk=job.pk).update(
        created=created - timedelta(seconds=35), heartbeat=timezone.now() - timedelta(seconds=35)
    )
    assert services.jobs_requeue_lost(older_than=stale) == []
    Job.objects.filter(pk=job.pk).update(heartbeat=timezone.now() - timedelta(seconds=80))
    with django_capture_on_commit_callbacks(execute=True):
        assert services.jobs_requeue_lost(older_than=stale) == [job.pk]
    Job.objects.filter(pk=job.pk).update(status="running", heartbeat=timezone.now() - timedelta(hours=1))
    assert services.jobs_requeue_lost(older_than=stale) == []


def test_files_a_stopped_job_wrote_after_its_stop_are_removed(user, rows, settings, tmp_path):
    from api import services
    from api.models import Job

    settings.MEDIA_ROOT = tmp_path
    model, dataset = rows
    jobs = {
        status: Job.objects.create(owner=user, type="dissect", model=model, dataset=dataset, status=status)
        for status in ("cancelled", "failed", "running", "succeeded")
    }
    for job in jobs.values():
        (tmp_path / "results" / f"job-{job.pk}").mkdir(parents=True)
        (tmp_path / "results" / f"job-{job.pk}" / "conv5.npz").write_bytes(b"x")
        (tmp_path / "work" / f"job-{job.pk}").mkdir(parents=True)
    for status, job in jobs.items():
        assert services.job_leftovers_remove(job_id=job.pk) == (status in ("cancelled", "failed"))
    left = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert left == sorted(f"job-{jobs[s].pk}" for s in ("running", "succeeded"))


def test_nul_characters_are_400_not_500(api, rows):
    from api.models import Job

    model, dataset = rows
    dataset.classes = ["a", "b"]
    dataset.save()
    job = Job.objects.create(owner=model.owner, type="dissect", model=model, dataset=dataset, status="succeeded")
    assert api.get(f"/api/jobs/{job.pk}/matrix/?layer=conv%00").status_code == 400
    assert api.get(f"/api/models/{model.pk}/classes/a/important-units/?layer=conv%00").status_code == 400
    for params in ({"layer": "conv5", "train_split": "tr\x00ain"}, {"layer": "conv5", "val_split": "\x00"}):
        response = api.post(
            "/api/jobs/", {"type": "ablate", "model": model.pk, "dataset": dataset.pk, "params": params}, format="json"
        )
        assert "NUL" in _error(response, 400)
    assert (
        api.post("/api/datasets/", {"name": "d\x00", "format": "broden", "path": "/x"}, format="json").status_code
        == 400
    )
    job.delete()

"""Nobody reads another user's private models, datasets, jobs or units, nor learns that they exist."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture()
def alice_rows(user):
    from api import services
    from api.models import Concept, Dataset, Job, NetworkModel, Unit

    model = NetworkModel.objects.create(owner=user, name="private-m", arch="builtin:scenecnn", weights_path="/x")
    dataset = Dataset.objects.create(owner=user, name="private-d", format="broden", path="/y")
    job = Job.objects.create(owner=user, type="dissect", model=model, dataset=dataset, status="succeeded")
    concept = Concept.objects.create(name="tree", category="object")
    unit = Unit.objects.create(job=job, model=model, layer="conv5", unit=3, label=concept, iou=0.2, threshold=1.0)
    services.concept_stats_refresh(model_id=model.pk)
    return {"model": model, "dataset": dataset, "job": job, "unit": unit}


@pytest.mark.parametrize("resource", ["models", "datasets", "jobs", "units"])
def test_private_rows_are_invisible_to_others(api, other_api, alice_rows, resource):
    row = alice_rows[resource.rstrip("s")]
    assert api.get(f"/api/{resource}/{row.pk}/").status_code == 200
    assert other_api.get(f"/api/{resource}/{row.pk}/").status_code == 404
    assert other_api.get(f"/api/{resource}/999999/").status_code == 404
    listed = other_api.get(f"/api/{resource}/").json()["results"]
    assert all(item["id"] != row.pk for item in listed)


def test_others_cannot_cancel_or_use_private_rows(api, other_api, alice_rows):
    job = alice_rows["job"]
    job.status = "running"
    job.save()
    assert other_api.post(f"/api/jobs/{job.pk}/cancel/").status_code == 404
    response = other_api.post(
        "/api/jobs/",
        {"type": "dissect", "model": alice_rows["model"].pk, "dataset": alice_rows["dataset"].pk},
        format="json",
    )
    assert response.status_code == 404
    assert api.post(f"/api/jobs/{job.pk}/cancel/").json()["status"] == "cancelled"
    assert api.post(f"/api/jobs/{job.pk}/cancel/").status_code == 409


def test_public_models_are_visible_but_not_their_owners_jobs(other_api, alice_rows):
    model = alice_rows["model"]
    model.public = True
    model.save()
    assert other_api.get(f"/api/models/{model.pk}/").status_code == 200
    assert other_api.get(f"/api/jobs/{alice_rows['job'].pk}/").status_code == 404


def test_concepts_count_only_visible_units(api, other_api, alice_rows):
    assert [c["name"] for c in api.get("/api/concepts/").json()["results"]] == ["tree"]
    assert other_api.get("/api/concepts/").json()["results"] == []


def _zip_with(name: str) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(name, "x")
    buffer.seek(0)
    buffer.name = "evil.zip"
    return buffer


@pytest.mark.parametrize("member", ["../escape.txt", "/abs/path.txt", "a/../../escape.txt"])
def test_archives_with_escaping_paths_are_refused(api, member, settings):
    from pathlib import Path

    before = set(Path(settings.MEDIA_ROOT).rglob("*")) if Path(settings.MEDIA_ROOT).exists() else set()
    response = api.post(
        "/api/datasets/", {"name": "evil", "format": "broden", "archive": _zip_with(member)}, format="multipart"
    )
    assert response.status_code == 400
    assert "outside the archive" in response.json()["message"]
    after = set(Path(settings.MEDIA_ROOT).rglob("*"))
    assert {p for p in after - before if p.is_file()} == set()


def test_tar_with_a_symlink_is_refused(api):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    buffer.seek(0)
    buffer.name = "evil.tar.gz"
    response = api.post("/api/datasets/", {"name": "evil", "format": "broden", "archive": buffer}, format="multipart")
    assert response.status_code == 400
    assert "link" in response.json()["message"]

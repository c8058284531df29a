"""Jobs go through the real broker to a real worker process and land in Postgres."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from conftest import register, wait_final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]


def test_dissection_job_end_to_end(api, other_api, celery_worker_process, scenes, demo_weights):
    from api.models import Unit, UnitConcept

    model, dataset = register(api, scenes, demo_weights)
    assert dataset["image_count"] == 24
    conv_layers = [layer for layer in model["layers"] if layer["type"] == "Conv2d"]
    layer = conv_layers[-1]
    response = api.post(
        "/api/jobs/",
        {"type": "dissect", "model": model["id"], "dataset": dataset["id"], "params": {"layers": [layer["name"]]}},
        format="json",
    )
    assert response.status_code == 202, response.json()
    job = wait_final(api, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["attempts"] == 1

    rows = Unit.objects.filter(job_id=job["id"], layer=layer["name"])
    assert rows.count() == layer["units"]
    assert UnitConcept.objects.filter(unit__job_id=job["id"]).count() == layer["units"] * 5
    units = api.get(f"/api/units/?job={job['id']}&page_size=1000").json()["results"]
    assert len(units) == layer["units"]
    assert all(0.0 <= u["iou"] <= 1.0 for u in units)
    assert [u["iou"] for u in units] == sorted((u["iou"] for u in units), reverse=True)
    concepts = api.get("/api/concepts/?limit=1000").json()["results"]
    assert sum(c["units"] for c in concepts) == sum(1 for u in units if u["label"] and u["iou"] >= 0.04)

    matrix = api.get(f"/api/jobs/{job['id']}/matrix/?layer={layer['name']}")
    lines = b"".join(matrix.streaming_content).decode().strip().splitlines()
    assert lines[0] == "unit,concept,category,iou"
    assert len(lines) == 1 + layer["units"] * dataset["concept_count"]
    npz = api.get(f"/api/jobs/{job['id']}/matrix/?layer={layer['name']}&as=npz")
    with np.load(io.BytesIO(b"".join(npz.streaming_content))) as data:
        assert data["iou"].shape == (layer["units"], dataset["concept_count"])
        best = data["iou"].max(axis=1)
    assert np.allclose(sorted(best, reverse=True), [u["iou"] for u in units], atol=1e-6)

    detail = api.get(f"/api/units/{units[0]['id']}/").json()
    assert len(detail["top_images"]) == 5
    image = api.get(detail["image_url"])
    assert image.status_code == 200 and image["Content-Type"] == "image/png"
    png = b"".join(image.streaming_content)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert other_api.get(detail["image_url"]).status_code == 404

    assert other_api.get(f"/api/jobs/{job['id']}/").status_code == 404
    assert other_api.get(f"/api/units/?job={job['id']}").json()["results"] == []
    assert other_api.get(f"/api/models/{model['id']}/").status_code == 404

    health = api.get("/api/health/")
    assert health.status_code == 200 and health.json()["workers"]["alive"] >= 1


def test_bad_input_fails_the_job_once_with_the_reason(api, celery_worker_process, scenes, demo_weights, data_root):
    copy = data_root / "scenes-doomed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(scenes, copy)
    model, _ = register(api, scenes, demo_weights)
    dataset = api.post("/api/datasets/", {"name": "doomed", "format": "synthetic", "path": str(copy)}, format="json")
    assert dataset.status_code == 201
    for image in (copy / "images").iterdir():
        image.unlink()
    response = api.post(
        "/api/jobs/", {"type": "dissect", "model": model["id"], "dataset": dataset.json()["id"]}, format="json"
    )
    job = wait_final(api, response.json()["id"])
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert "images" in job["error"]


def test_matrix_download_needs_a_succeeded_job(api, scenes, demo_weights):
    from django.contrib.auth import get_user_model

    from api.models import Dataset, Job, NetworkModel

    user = get_user_model().objects.get(username="alice")
    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x", layers=[])
    dataset = Dataset.objects.create(owner=user, name="d", format="broden", path=str(scenes))
    job = Job.objects.create(owner=user, type="dissect", model=model, dataset=dataset, status="running")
    response = api.get(f"/api/jobs/{job.pk}/matrix/?layer=conv5")
    assert response.status_code == 409 and "running" in response.json()["message"]

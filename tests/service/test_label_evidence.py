"""Label evidence through the service: computed by a real worker, stored in Postgres, served and
filtered by the API, the same for a sharded job as for an unsharded one."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import register, wait_final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]

EVIDENCE = ("iou_ci", "stability", "runner_up", "runner_up_iou", "margin", "chance_iou", "p_value")


def _dissect(api, model, dataset, layer: str, **params) -> dict:
    response = api.post(
        "/api/jobs/",
        {"type": "dissect", "model": model["id"], "dataset": dataset["id"], "params": {"layers": [layer], **params}},
        format="json",
    )
    assert response.status_code == 202, response.json()
    job = wait_final(api, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def _units(api, job_id: int, query: str = "") -> list[dict]:
    return api.get(f"/api/units/?job={job_id}&page_size=1000{query}").json()["results"]


def test_evidence_stored_served_and_filtered(api, celery_worker_process, scenes, demo_weights):
    model, dataset = register(api, scenes, demo_weights)
    layer = [entry for entry in model["layers"] if entry["type"] == "Conv2d"][-1]["name"]
    job = _dissect(api, model, dataset, layer, evidence_blocks=8, resamples=200)
    assert job["params"]["evidence_blocks"] == 8 and job["params"]["resamples"] == 200
    assert job["params"]["evidence_seed"] == 0
    units = _units(api, job["id"])
    labelled = [u for u in units if u["label"]]
    assert labelled, "the random scenecnn labels some units"
    for u in labelled:
        low, high = u["iou_ci"]
        assert 0.0 <= low <= high <= 1.0
        assert 0.0 <= u["stability"] <= 1.0 and 0.0 <= u["p_value"] <= 1.0
        assert 0.0 <= u["chance_iou"] <= 1.0
        if u["runner_up"] is not None:
            assert u["runner_up"] != u["label"] or u["runner_up_category"] != u["category"]
            assert u["margin"] == pytest.approx(u["iou"] - u["runner_up_iou"])
    summary = next(r for r in api.get(f"/api/models/{model['id']}/layers/").json() if r["layer"] == layer)["summary"]
    assert summary["evidence"]["blocks"] >= 2 and summary["evidence"]["resamples"] == 200

    stable = _units(api, job["id"], "&min_stability=0.9")
    assert {u["id"] for u in stable} == {u["id"] for u in labelled if u["stability"] >= 0.9}
    significant = _units(api, job["id"], "&max_p_value=0.05")
    assert {u["id"] for u in significant} == {u["id"] for u in labelled if u["p_value"] <= 0.05}
    assert api.get("/api/units/?min_stability=high").status_code == 400

    concepts = api.get("/api/concepts/?limit=1000&min_iou=0&min_stability=0.5").json()["results"]
    expected = [u for u in labelled if u["stability"] >= 0.5]
    assert sum(c["units"] for c in concepts) == len(expected)
    for bad in ("min_stability=2", "max_p_value=-1", "max_p_value=nan", "min_stability=x"):
        response = api.get(f"/api/concepts/?{bad}")
        assert response.status_code == 400 and bad.split("=")[0] in response.json()["message"]

    matrix = api.get(f"/api/jobs/{job['id']}/matrix/?layer={layer}&intervals=true")
    lines = b"".join(matrix.streaming_content).decode().strip().splitlines()
    assert lines[0] == "unit,concept,category,iou,iou_low,iou_high"
    for line in lines[1:50]:
        iou, low, high = (float(v) for v in line.split(",")[-3:])
        assert low - 1e-6 <= iou <= high + 1e-6
    assert api.get(f"/api/jobs/{job['id']}/matrix/?layer={layer}&intervals=maybe").status_code == 400
    npz = api.get(f"/api/jobs/{job['id']}/matrix/?layer={layer}&as=npz")
    with np.load(io.BytesIO(b"".join(npz.streaming_content))) as data:
        assert data["iou_low"].shape == data["iou"].shape == data["iou_high"].shape

    # evidence_blocks 1: no evidence, the same labels
    plain = _dissect(api, model, dataset, layer, evidence_blocks=1)
    plain_units = {u["unit"]: u for u in _units(api, plain["id"])}
    for u in units:
        assert plain_units[u["unit"]]["label"] == u["label"] and plain_units[u["unit"]]["iou"] == u["iou"]
        assert all(plain_units[u["unit"]][name] is None for name in EVIDENCE)
    for bad in ({"evidence_blocks": 0}, {"evidence_blocks": 65}, {"resamples": 50}, {"evidence_seed": -1}):
        response = api.post(
            "/api/jobs/",
            {"type": "dissect", "model": model["id"], "dataset": dataset["id"], "params": {"layers": [layer], **bad}},
            format="json",
        )
        assert response.status_code == 400 and next(iter(bad)) in str(response.json())


def test_sharded_job_gives_the_same_evidence(api, celery_worker_process, scenes, demo_weights):
    model, dataset = register(api, scenes, demo_weights)
    layer = [entry for entry in model["layers"] if entry["type"] == "Conv2d"][-1]["name"]
    whole = _dissect(api, model, dataset, layer, resamples=300)
    sharded = _dissect(api, model, dataset, layer, resamples=300, shard_size=9)
    from api.models import JobShard

    assert JobShard.objects.filter(job_id=sharded["id"], stage="count").count() == 3  # 24 images, 9 per shard
    a = {u["unit"]: u for u in _units(api, whole["id"])}
    b = {u["unit"]: u for u in _units(api, sharded["id"])}
    assert a.keys() == b.keys()
    for unit, row in a.items():
        for name in ("label", "iou", "threshold", *EVIDENCE):
            assert row[name] == b[unit][name], (unit, name)
    assert any(row["stability"] is not None for row in a.values())

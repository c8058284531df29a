"""Ablate jobs through the real queue: stored importance and curves, served by the API."""

from __future__ import annotations

import pytest
from conftest import register, wait_final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]


def test_ablate_job_end_to_end(api, other_api, celery_worker_process, scenes, demo_weights):
    from api.models import AblationCurve, ClassUnitImportance

    model, dataset = register(api, scenes, demo_weights)
    dissect = api.post(
        "/api/jobs/",
        {"type": "dissect", "model": model["id"], "dataset": dataset["id"], "params": {"layers": ["conv5.0"]}},
        format="json",
    ).json()
    assert wait_final(api, dissect["id"])["status"] == "succeeded"

    response = api.post(
        "/api/jobs/",
        {
            "type": "ablate",
            "model": model["id"],
            "dataset": dataset["id"],
            "params": {"layer": "conv5.0", "ks": [1, 2, 20]},
        },
        format="json",
    )
    assert response.status_code == 202, response.json()
    job = wait_final(api, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]

    result = api.get(f"/api/jobs/{job['id']}/ablation/").json()
    summary = result["summary"]
    classes = summary["classes"]
    assert len(classes) == len(dataset["classes"])
    tested = {c["class_index"] for c in result["curves"]}
    assert len(result["curves"]) == len(tested) * 3
    assert sorted({c["k"] for c in result["curves"]}) == [1, 2, 20]
    assert summary["interpretability"]["dissection_job"] == dissect["id"]
    assert len(summary["interpretability"]["iou"]) == 128
    assert ClassUnitImportance.objects.filter(job_id=job["id"]).count() <= 128 * len(classes)
    assert AblationCurve.objects.filter(job_id=job["id"]).count() == len(result["curves"])

    cls = classes[next(iter(tested))]
    top = api.get(f"/api/models/{model['id']}/classes/{cls}/important-units/?limit=5").json()
    assert top["job"] == job["id"] and top["layer"] == "conv5.0"
    assert [u["rank"] for u in top["units"]] == [0, 1, 2, 3, 4]
    drops = [u["balanced_accuracy"] for u in top["units"]]
    assert drops == sorted(drops)
    assert all(u["label"] is not None or u["iou"] == 0 for u in top["units"])

    attack = api.post(
        "/api/jobs/",
        {
            "type": "attack",
            "model": model["id"],
            "dataset": dataset["id"],
            "params": {"layer": "conv5.0", "split": "train", "max_images": 6, "iterations": 5},
        },
        format="json",
    )
    assert attack.status_code == 202, attack.json()
    attacked = wait_final(api, attack.json()["id"])
    assert attacked["status"] == "succeeded", attacked["error"]
    result = attacked["summary"]
    assert result["ablation_job"] == job["id"] and 0.0 <= result["success_rate"] <= 1.0
    assert 1 <= result["attacked"] <= 6

    best = api.get(f"/api/units/?job={dissect['id']}&page_size=1").json()["results"][0]
    scored = api.post(
        "/api/jobs/",
        {
            "type": "unit_classifier",
            "model": model["id"],
            "dataset": dataset["id"],
            "params": {"layer": "conv5.0", "unit": best["unit"], "concept": best["label"]},
        },
        format="json",
    )
    assert scored.status_code == 202, scored.json()
    scored = wait_final(api, scored.json()["id"])
    assert scored["status"] == "succeeded", scored["error"]
    verdict = scored["summary"]
    assert verdict["unit"] == best["unit"] and verdict["concept"] == best["label"]
    assert verdict["images_with"] + verdict["images_without"] == dataset["image_count"]
    assert 0.5 <= verdict["balanced_accuracy"] <= 1.0
    assert len(verdict["peaks_with"]) == verdict["images_with"]
    missing_concept = api.post(
        "/api/jobs/",
        {
            "type": "unit_classifier",
            "model": model["id"],
            "dataset": dataset["id"],
            "params": {"layer": "conv5.0", "unit": 0, "concept": "unicorn"},
        },
        format="json",
    ).json()
    failed = wait_final(api, missing_concept["id"])
    assert failed["status"] == "failed" and "no concept 'unicorn'" in failed["error"]

    assert other_api.get(f"/api/jobs/{job['id']}/ablation/").status_code == 404
    assert other_api.get(f"/api/models/{model['id']}/classes/{cls}/important-units/").status_code == 404
    missing = api.get(f"/api/models/{model['id']}/classes/no-such-class/important-units/")
    assert missing.status_code == 404 and "not a class" in missing.json()["message"]


@pytest.mark.django_db
def test_ablate_params_are_checked(api, user):
    from api.models import Dataset, NetworkModel

    layers = [{"name": "conv5.0", "type": "Conv2d", "units": 8, "height": 4, "width": 4}]
    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x", layers=layers)
    plain = Dataset.objects.create(owner=user, name="plain", format="broden", path="/y")
    scenes = Dataset.objects.create(owner=user, name="s", format="broden", path="/y", classes=["a", "b"])
    cases = [
        (plain, {"layer": "conv5.0"}, "class labels"),
        (scenes, {}, "params.layer"),
        (scenes, {"layer": "conv9"}, "params.layer"),
        (scenes, {"layer": "conv5.0", "ks": [0]}, "params.ks"),
        (scenes, {"layer": "conv5.0", "classes": [5]}, "params.classes"),
    ]
    response = api.post(
        "/api/jobs/",
        {"type": "attack", "model": model.pk, "dataset": scenes.pk, "params": {"layer": "conv5.0"}},
        format="json",
    )
    assert response.status_code == 400 and "succeeded ablate job" in response.json()["message"]
    for dataset, params, needle in cases:
        response = api.post(
            "/api/jobs/", {"type": "ablate", "model": model.pk, "dataset": dataset.pk, "params": params}, format="json"
        )
        assert response.status_code == 400 and needle in response.json()["message"], (params, response.json())

"""Generator jobs through the real queue: dissection of generated images, removal, insertion, painting.

The generator is a randomly initialised built-in DCGAN (its units' effects are not known,
so these tests check the plumbing: the core's known-answer tests on hand-built generators
are in tests/core/test_generators.py); the concept source is colours or a segmenter.
"""

from __future__ import annotations

import base64
import io

import pytest
from conftest import wait_final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]

LATENT = 16


@pytest.fixture()
def generator_weights(data_root):
    import torch
    from safetensors.torch import save_file

    from dissect_core.gan import build_generator

    path = data_root / "dcgan-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        net = build_generator("dcgan", latent_dim=LATENT)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture()
def segmenter_weights(data_root):
    import torch
    from safetensors.torch import save_file

    from dissect_core.archs import segnet

    path = data_root / "segnet-random-3.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in segnet(3).state_dict().items()}, str(path))
    return path


def register_generator(api, weights, **extra):
    response = api.post(
        "/api/models/",
        {"name": "dcgan", "arch": "builtin:dcgan", "kind": "generator", "weights_path": str(weights), **extra},
        format="json",
    )
    assert response.status_code == 201, response.json()
    return response.json()


def submit(api, model_id, type_, params, dataset=None):
    body = {"type": type_, "model": model_id, "params": params}
    if dataset is not None:
        body["dataset"] = dataset
    return api.post("/api/jobs/", body, format="json")


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def test_generator_dissect_remove_insert_paint(api, other_api, celery_worker_process, generator_weights):
    from api.models import Unit

    model = register_generator(api, generator_weights)
    assert model["kind"] == "generator" and model["latent_dim"] == LATENT
    assert model["output_range"] == [-1.0, 1.0]
    layers = {entry["name"]: entry for entry in model["layers"]}
    assert {"layer1", "layer2", "layer3", "layer4"} <= set(layers)

    early = submit(api, model["id"], "generator_remove", {"layer": "layer3", "concept": "red-c"})
    assert early.status_code == 400 and "run a dissect job" in early.json()["message"]

    response = submit(api, model["id"], "dissect", {"layers": ["layer3"], "samples": 48, "concepts": "colors"})
    assert response.status_code == 202, response.json()
    assert response.json()["dataset"] is None
    job = wait_final(api, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    units = Unit.objects.filter(job_id=job["id"], layer="layer3")
    assert units.count() == layers["layer3"]["units"]
    labelled = units.exclude(label=None).order_by("-iou").first()
    assert labelled is not None and labelled.label.category == "color"
    concept = labelled.label.name
    unit_page = api.get(f"/api/units/?job={job['id']}&page_size=5").json()
    assert len(unit_page["results"]) == 5
    assert other_api.get(f"/api/jobs/{job['id']}/").status_code == 404

    remove = submit(
        api,
        model["id"],
        "generator_remove",
        {"layer": "layer3", "concept": concept, "ks": [1, 4], "samples": 16, "sample_images": 4},
    )
    assert remove.status_code == 202, remove.json()
    removed = wait_final(api, remove.json()["id"])
    assert removed["status"] == "succeeded", removed["error"]
    summary = removed["summary"]
    assert summary["concept"] == concept and summary["units"][0] == labelled.unit
    assert [row["k"] for row in summary["curve"]] == [1, 4]
    assert 0.0 <= summary["baseline"] <= 1.0
    for name in summary["images"].values():
        image = api.get(f"/api/jobs/{removed['id']}/images/{name}/")
        assert image.status_code == 200 and image["Content-Type"] == "image/png"
        png_size(b"".join(image.streaming_content))
    assert api.get(f"/api/jobs/{removed['id']}/images/nothing/").status_code == 404
    rerun = submit(api, model["id"], "generator_remove", removed["params"])
    assert rerun.status_code == 202, rerun.json()  # a job's own cleaned params are valid input
    assert wait_final(api, rerun.json()["id"])["status"] == "succeeded"
    assert other_api.get(f"/api/jobs/{removed['id']}/images/removal-after/").status_code == 404

    insert = submit(
        api, model["id"], "generator_insert", {"layer": "layer3", "concept": concept, "k": 4, "samples": 4, "stride": 4}
    )
    assert insert.status_code == 202, insert.json()
    inserted = wait_final(api, insert.json()["id"])
    assert inserted["status"] == "succeeded", inserted["error"]
    grid = inserted["summary"]["map"]
    assert len(grid) == layers["layer3"]["height"] // 4 and len(grid[0]) == layers["layer3"]["width"] // 4
    assert len(inserted["summary"]["values"]) == 4

    mask = [[1 if 2 <= x < 6 and 2 <= y < 6 else 0 for x in range(8)] for y in range(8)]
    painted = api.post(
        f"/api/models/{model['id']}/paint/",
        {"layer": "layer3", "concept": concept, "mask": mask, "seed": 3, "k": 4},
        format="json",
    )
    assert painted.status_code == 200, painted.content[:300]
    assert painted["Content-Type"] == "image/png"
    assert png_size(painted.content) == (64, 64)
    both = api.post(
        f"/api/models/{model['id']}/paint/?as=json",
        {"layer": "layer3", "concept": concept, "mask": mask, "seed": 3, "k": 4, "mode": "erase"},
        format="json",
    )
    assert both.status_code == 200
    body = both.json()
    assert png_size(base64.b64decode(body["before"])) == (64, 64)
    assert body["units"] == summary["units"][:4] and body["dissection"] == job["id"]

    bad = api.post(
        f"/api/models/{model['id']}/paint/",
        {"layer": "layer3", "concept": concept, "mask": [[0, 0], [0, 0]]},
        format="json",
    )
    assert bad.status_code == 400 and "mask" in str(bad.json())
    unknown = api.post(
        f"/api/models/{model['id']}/paint/",
        {"layer": "layer3", "concept": "no-such-concept", "mask": mask},
        format="json",
    )
    assert unknown.status_code == 400 and "no-such-concept" in unknown.json()["message"]
    hidden = other_api.post(
        f"/api/models/{model['id']}/paint/", {"layer": "layer3", "concept": concept, "mask": mask}, format="json"
    )
    assert hidden.status_code == 404


def test_generator_jobs_refuse_bad_params(api, generator_weights, demo_weights, scenes):
    from conftest import register

    from api.models import Job, NetworkModel

    model = register_generator(api, generator_weights)
    classifier, dataset = register(api, scenes, demo_weights)
    cases = [
        (model["id"], "dissect", {"layers": ["layer3"]}, dataset["id"], "take no dataset"),
        (model["id"], "dissect", {}, None, "params.layers is required"),
        (model["id"], "dissect", {"layers": ["nope"]}, None, "unknown layer"),
        (model["id"], "dissect", {"layers": ["layer3"], "concepts": 99999}, None, "segmenter"),
        (model["id"], "dissect", {"layers": ["layer3"], "samples": 0}, None, "params.samples"),
        (model["id"], "dissect", {"layers": ["layer3"], "max_images": 5}, None, "params.samples"),
        (model["id"], "ablate", {"layer": "layer3"}, None, "generator"),
        (model["id"], "generator_insert", {"layer": "layer3", "concept": "red-c", "bogus": 1}, None, "bogus"),
        (
            classifier["id"],
            "generator_remove",
            {"layer": "conv5", "concept": "tree"},
            dataset["id"],
            "needs a generator",
        ),
        (classifier["id"], "dissect", {}, None, "need a dataset"),
    ]
    for model_id, type_, params, ds, needle in cases:
        response = submit(api, model_id, type_, params, ds)
        assert response.status_code == 400, (type_, params, response.json())
        assert needle in str(response.json()), (needle, response.json())
    assert Job.objects.count() == 0

    no_latent = api.post(
        "/api/models/",
        {"name": "g", "arch": "torchscript", "kind": "generator", "weights_path": str(generator_weights)},
        format="json",
    )
    assert no_latent.status_code == 400 and "latent_dim" in no_latent.json()["message"]
    wrong = api.post(
        "/api/models/",
        {
            "name": "g",
            "arch": "builtin:dcgan",
            "kind": "generator",
            "latent_dim": 7,
            "weights_path": str(generator_weights),
        },
        format="json",
    )
    assert wrong.status_code == 400
    assert NetworkModel.objects.count() == 2


def test_segmenter_as_concept_source(api, celery_worker_process, generator_weights, segmenter_weights):
    from api.models import Unit

    bad = api.post(
        "/api/models/",
        {
            "name": "seg",
            "arch": "builtin:segnet",
            "kind": "segmenter",
            "weights_path": str(segmenter_weights),
            "classes": ["-", "a"],
        },
        format="json",
    )
    assert bad.status_code == 400
    unlabelled = api.post(
        "/api/models/",
        {"name": "seg", "arch": "builtin:segnet", "kind": "segmenter", "weights_path": str(segmenter_weights)},
        format="json",
    )
    assert unlabelled.status_code == 400 and "classes" in unlabelled.json()["message"]
    seg = api.post(
        "/api/models/",
        {
            "name": "seg",
            "arch": "builtin:segnet",
            "kind": "segmenter",
            "input_size": 64,
            "weights_path": str(segmenter_weights),
            "classes": ["-", "blob", "spot"],
        },
        format="json",
    )
    assert seg.status_code == 201, seg.json()
    assert seg.json()["categories"] == ["-", "object", "object"]

    model = register_generator(api, generator_weights)
    response = submit(
        api,
        model["id"],
        "dissect",
        {"layers": ["layer2"], "samples": 16, "concepts": seg.json()["id"], "top_k_images": 0},
    )
    assert response.status_code == 202, response.json()
    job = wait_final(api, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    labels = set(Unit.objects.filter(job_id=job["id"]).exclude(label=None).values_list("label__name", flat=True))
    assert labels <= {"blob", "spot"}

"""Any vision model through the real service (probe, worker, Postgres): timm models, torchvision
transformers and a torch.export archive are registered, their layers listed with their layouts, a
transformer block and an MLP hidden layer dissected to stored units, and a ViT block ablated."""

from __future__ import annotations

import pytest
from conftest import wait_final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]


def _save(net, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture()
def vision_weights(data_root, scenes):
    """Random weights (seeded) for the scene classes: timm ViT-Tiny at 32 px, timm ConvNeXt-Atto,
    torchvision Swin-T and ViT-B/16 (at 32 px), and a torchvision resnet18 both as weights and as a
    .pt2 export."""
    import timm
    import torch
    import torchvision

    from dissect_core.datasets import open_dataset

    n = len(open_dataset(f"broden:{scenes}").classes)
    folder = data_root / "vision-models"
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    paths = {
        "vit": _save(timm.create_model("vit_tiny_patch16_224", num_classes=n, img_size=32), folder / "vit.safetensors"),
        "convnext": _save(timm.create_model("convnext_atto", num_classes=n), folder / "convnext.safetensors"),
        "swin": _save(torchvision.models.swin_t(num_classes=n), folder / "swin.safetensors"),
        "vit_b": _save(torchvision.models.vit_b_16(num_classes=n, image_size=32), folder / "vit_b.safetensors"),
    }
    resnet = torchvision.models.resnet18(num_classes=n).eval()
    paths["resnet"] = _save(resnet, folder / "resnet.safetensors")
    program = torch.export.export(
        resnet, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(folder / "resnet.pt2"))
    paths["pt2"] = str(folder / "resnet.pt2")
    return paths


def _register(api, name: str, arch: str, weights_path: str, **extra) -> dict:
    response = api.post(
        "/api/models/", {"name": name, "arch": arch, "weights_path": weights_path, **extra}, format="json"
    )
    assert response.status_code == 201, response.json()
    return response.json()


def _dissect(api, model: int, dataset: int, layers: list[str]) -> dict:
    response = api.post(
        "/api/jobs/",
        {"type": "dissect", "model": model, "dataset": dataset, "params": {"layers": layers, "top_k_images": 0}},
        format="json",
    )
    assert response.status_code == 202, response.json()
    job = wait_final(api, response.json()["id"], timeout=400)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_transformers_timm_and_exported_models_end_to_end(api, celery_worker_process, scenes, vision_weights):
    from api.models import Unit

    dataset = api.post(
        "/api/datasets/", {"name": "scenes", "format": "synthetic", "path": str(scenes)}, format="json"
    ).json()
    vit = _register(api, "vit", "timm:vit_tiny_patch16_224", vision_weights["vit"], input_size=32)
    assert vit["input_size"] == 32 and vit["mean"] == [0.5, 0.5, 0.5]  # timm's own normalisation
    layers = {row["layer"]: row for row in api.get(f"/api/models/{vit['id']}/layers/").json()}
    block, hidden = layers["blocks.6"], layers["blocks.6.mlp.act"]
    assert (block["kind"], block["units"], block["height"], block["width"], block["prefix"]) == (
        "tokens",
        192,
        2,
        2,
        ["class"],
    )
    assert hidden["units"] == 768 and "class token excluded" in hidden["description"]
    assert list(layers).index("blocks.5") < list(layers).index("blocks.6")

    job = _dissect(api, vit["id"], dataset["id"], ["blocks.6", "blocks.6.mlp.act"])
    assert Unit.objects.filter(job_id=job["id"], layer="blocks.6").count() == 192
    assert Unit.objects.filter(job_id=job["id"], layer="blocks.6.mlp.act").count() == 768
    assert any("resized to the model's input size 32 x 32" in note for note in job["summary"]["notes"])
    listed = {row["layer"]: row for row in api.get(f"/api/models/{vit['id']}/layers/").json()}
    assert listed["blocks.6"]["job"] == job["id"] and listed["blocks.6"]["summary"]["units"] == 192

    ablate = api.post(
        "/api/jobs/",
        {"type": "ablate", "model": vit["id"], "dataset": dataset["id"], "params": {"layer": "blocks.6", "ks": [1, 4]}},
        format="json",
    )
    assert ablate.status_code == 202, ablate.json()
    done = wait_final(api, ablate.json()["id"], timeout=400)
    assert done["status"] == "succeeded", done["error"]
    assert len(done["summary"]["tied_units"]) == len(done["summary"]["classes"])

    vit_b = _register(api, "vit-b", "torchvision:vit_b_16", vision_weights["vit_b"], input_size=32)
    job = _dissect(
        api, vit_b["id"], dataset["id"], ["encoder.layers.encoder_layer_6", "encoder.layers.encoder_layer_6.mlp.1"]
    )
    assert Unit.objects.filter(job_id=job["id"], layer="encoder.layers.encoder_layer_6").count() == 768
    assert Unit.objects.filter(job_id=job["id"], layer="encoder.layers.encoder_layer_6.mlp.1").count() == 3072

    convnext = _register(api, "convnext", "timm:convnext_atto", vision_weights["convnext"], input_size=64)
    swin = _register(api, "swin", "torchvision:swin_t", vision_weights["swin"], input_size=64)
    swin_layers = {row["layer"]: row for row in api.get(f"/api/models/{swin['id']}/layers/").json()}
    assert swin_layers["features.3"]["kind"] == "channels_last" and swin_layers["head"]["kind"] == "vector"
    job = _dissect(api, swin["id"], dataset["id"], ["features.3", "features.3.1.mlp.1"])
    assert Unit.objects.filter(job_id=job["id"], layer="features.3").count() == 192
    job = _dissect(api, convnext["id"], dataset["id"], ["stages.2"])
    assert Unit.objects.filter(job_id=job["id"], layer="stages.2").count() == 160

    native = _register(api, "r18", "torchvision:resnet18", vision_weights["resnet"], input_size=64)
    exported = _register(api, "r18-export", "exported", vision_weights["pt2"])
    assert exported["input_size"] == 64 and exported["num_classes"] == native["num_classes"]
    assert [(r["name"], r["units"]) for r in exported["layers"]] == [(r["name"], r["units"]) for r in native["layers"]]
    a = _dissect(api, native["id"], dataset["id"], ["layer4"])
    b = _dissect(api, exported["id"], dataset["id"], ["layer4"])
    rows_a = list(Unit.objects.filter(job_id=a["id"]).order_by("unit").values_list("label_name", "iou", "threshold"))
    rows_b = list(Unit.objects.filter(job_id=b["id"]).order_by("unit").values_list("label_name", "iou", "threshold"))
    assert len(rows_a) == 512 and [r[0] for r in rows_a] == [r[0] for r in rows_b]
    assert all(abs(x[1] - y[1]) < 1e-6 and abs(x[2] - y[2]) < 1e-5 for x, y in zip(rows_a, rows_b, strict=True))


def test_vision_model_inputs_that_cannot_work_get_a_4xx(api, scenes, vision_weights):
    from api.models import NetworkModel

    bad = api.post(
        "/api/models/", {"name": "x", "arch": "timm:vit_tinyy", "weights_path": vision_weights["vit"]}, format="json"
    )
    assert bad.status_code == 400 and "unknown timm model 'vit_tinyy'" in bad.json()["message"]
    other = api.post(
        "/api/models/",
        {"name": "x", "arch": "timm:convnext_atto", "weights_path": vision_weights["vit"]},
        format="json",
    )
    assert other.status_code == 400 and "do not fit" in other.json()["message"]
    sized = api.post(
        "/api/models/",
        {"name": "x", "arch": "exported", "weights_path": vision_weights["pt2"], "input_size": 96},
        format="json",
    )
    assert sized.status_code == 400 and "exported for 64 x 64" in sized.json()["message"]
    assert NetworkModel.objects.count() == 0

    vit = _register(api, "vit", "timm:vit_tiny_patch16_224", vision_weights["vit"], input_size=32)
    dataset = api.post(
        "/api/datasets/", {"name": "scenes", "format": "synthetic", "path": str(scenes)}, format="json"
    ).json()

    def submit(params):
        return api.post(
            "/api/jobs/",
            {"type": "dissect", "model": vit["id"], "dataset": dataset["id"], "params": params},
            format="json",
        )

    response = submit({"layers": ["blocks.99"]})
    assert response.status_code == 400 and "unknown layer(s) blocks.99" in response.json()["message"]
    response = submit({"layers": ["blocks.0.attn.q_norm"]})
    assert response.status_code == 400 and "cannot be laid out as unit maps" in response.json()["message"]

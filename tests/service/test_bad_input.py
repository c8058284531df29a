"""Every malformed request gets a 4xx whose message names the problem, and leaves nothing behind.

(Unknown job type, weights_path outside DATA_ROOTS, archive members outside the archive and
links in archives are covered in test_basics.py and test_ownership.py.)
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.django_db

PIXEL_LIMIT = 1 << 26  # dissect_core.broden.MAX_IMAGE_PIXELS


@pytest.fixture()
def media(settings, tmp_path):
    """A fresh MEDIA_ROOT per test, so that "nothing left behind" is exact."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MEDIA_ROOT.mkdir()
    return settings.MEDIA_ROOT


def _assert_nothing_left(media: Path) -> None:
    from api.models import Dataset, Job, NetworkModel, Unit

    assert NetworkModel.objects.count() == 0
    assert Dataset.objects.count() == 0
    assert Job.objects.count() == 0
    assert Unit.objects.count() == 0
    assert [p for p in (media / "uploads").rglob("*") if p.is_file()] == []


@pytest.fixture()
def nothing_left(media):
    """After the test: no model, dataset, job or unit rows and no file under MEDIA_ROOT/uploads."""
    yield
    _assert_nothing_left(media)


def _bad(response, status: int, *needles: str) -> str:
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"message", "extra"}, body
    text = (body["message"] + " " + str(body["extra"])).lower()
    for needle in needles:
        assert needle.lower() in text, (needle, body)
    return body["message"]


def _upload(data: bytes, name: str) -> io.BytesIO:
    buffer = io.BytesIO(data)
    buffer.name = name
    return buffer


@pytest.fixture(scope="module")
def scenecnn_state():
    import torch

    from dissect_core.archs import ARCHS

    torch.manual_seed(0)
    net = ARCHS["scenecnn"](num_classes=6)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def _safetensors(state) -> bytes:
    from safetensors.torch import save

    return save(state)


def _register(api, weights: io.BytesIO, **fields):
    data = {"name": "m", "arch": "builtin:scenecnn", "num_classes": 6, "input_size": 64, "weights": weights, **fields}
    return api.post("/api/models/", data, format="multipart")


# ---------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({}, "name"),
        ({"name": "m"}, "arch"),
        ({"name": "m", "arch": "caffe:alexnet", "weights_path": "/x"}, "arch must be"),
        ({"name": "m", "arch": "builtin:scenecnn"}, "give exactly one of weights"),
        ({"name": "m", "arch": "builtin:scenecnn", "num_classes": 0, "weights_path": "/x"}, "num_classes"),
        ({"name": "m", "arch": "builtin:scenecnn", "std": [1, 0, 1], "weights_path": "/x"}, "std"),
    ],
)
def test_model_fields_missing_or_malformed(api, nothing_left, payload, needle):
    _bad(api.post("/api/models/", payload, format="json"), 400, needle)


def test_model_with_both_an_upload_and_a_path(api, nothing_left, scenecnn_state, data_root):
    path = data_root / "both.safetensors"
    path.write_bytes(_safetensors(scenecnn_state))
    response = _register(api, _upload(path.read_bytes(), "w.safetensors"), weights_path=str(path))
    _bad(response, 400, "exactly one of weights")


def test_model_weights_with_an_unknown_suffix(api, nothing_left):
    _bad(_register(api, _upload(b"\x00" * 64, "weights.bin")), 400, "weights.bin", ".safetensors")


def test_unknown_architecture_names_the_known_ones(api, nothing_left, scenecnn_state):
    response = _register(api, _upload(_safetensors(scenecnn_state), "w.safetensors"), arch="torchvision:notanet")
    message = _bad(response, 400, "notanet")
    assert "resnet18" in message


def test_weights_that_do_not_fit_name_missing_and_unexpected_keys(api, nothing_left, scenecnn_state):
    import torch

    state = dict(scenecnn_state)
    state.pop("conv1.0.weight")
    state["head.extra.weight"] = torch.zeros(3)
    response = _register(api, _upload(_safetensors(state), "w.safetensors"))
    _bad(response, 400, "do not fit", "missing keys", "conv1.0.weight", "unexpected keys", "head.extra.weight")


def test_truncated_weights(api, nothing_left, scenecnn_state):
    data = _safetensors(scenecnn_state)
    _bad(_register(api, _upload(data[: len(data) // 2], "w.safetensors")), 400, "truncated or corrupt")


class _Payload:
    """Unpickling this calls open(path, "w"): it creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_a_pickle_that_runs_code_is_never_unpickled(api, nothing_left, tmp_path, container):
    import torch

    marker = tmp_path / "pwned"
    if container == "pickle":
        data = pickle.dumps({"conv1.0.weight": _Payload(marker)}, protocol=2)
    else:
        buffer = io.BytesIO()
        torch.save({"state_dict": _Payload(marker)}, buffer)
        data = buffer.getvalue()
    assert not marker.exists()
    response = _register(api, _upload(data, "evil.pt"))
    _bad(response, 400, "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("member", ["data/sample_inputs/model.pt", "data/weights/model.pt"])
def test_an_exported_archive_that_would_unpickle_code_is_refused(api, nothing_left, tmp_path, member):
    """A torch.export .pt2 whose sample inputs (which torch.export.load unpickles, falling back to
    weights_only=False) or a legacy weights file is a pickle that creates a file: refused, never run."""
    import zipfile

    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("b")},))
    good = tmp_path / "good.pt2"
    torch.export.save(program, str(good))
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            if not info.filename.endswith(member):
                dst.writestr(info, src.read(info))
        dst.writestr(f"{root}/{member}", pickle.dumps(_Payload(marker), protocol=2))
    response = _register(api, _upload(evil.getvalue(), "evil.pt2"), arch="exported", num_classes=2, input_size=16)
    _bad(response, 400, "refusing")
    assert not marker.exists()


def test_oversized_weights_upload(api, nothing_left, settings, scenecnn_state):
    settings.FILE_UPLOAD_MAX_BYTES = 4096
    response = _register(api, _upload(_safetensors(scenecnn_state), "w.safetensors"))
    _bad(response, 413, "larger than 4096 bytes")


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({}, "name"),
        ({"name": "d"}, "format"),
        ({"name": "d", "format": "lmdb", "path": "/x"}, "format"),
        ({"name": "d", "format": "broden"}, "exactly one of path"),
        ({"name": "d", "format": "broden", "path": "/x", "concepts": "scenes"}, "concepts"),
    ],
)
def test_dataset_fields_missing_or_malformed(api, nothing_left, payload, needle):
    _bad(api.post("/api/datasets/", payload, format="json"), 400, needle)


@pytest.mark.parametrize("where", ["/etc", "ROOT/../..", "/"])
def test_dataset_path_outside_data_roots(api, nothing_left, data_root, where):
    path = where.replace("ROOT", str(data_root))
    response = api.post("/api/datasets/", {"name": "d", "format": "broden", "path": path}, format="json")
    _bad(response, 400, "outside the configured data roots")


def test_dataset_path_that_is_missing_or_not_a_directory(api, nothing_left, data_root):
    response = api.post(
        "/api/datasets/", {"name": "d", "format": "broden", "path": str(data_root / "no-such")}, format="json"
    )
    _bad(response, 400, "does not exist")
    (data_root / "a-file.txt").write_text("x")
    response = api.post(
        "/api/datasets/", {"name": "d", "format": "broden", "path": str(data_root / "a-file.txt")}, format="json"
    )
    _bad(response, 400, "not a directory")


def test_dataset_archive_of_an_unknown_kind_or_corrupt(api, nothing_left):
    response = api.post(
        "/api/datasets/",
        {"name": "d", "format": "imagefolder", "archive": _upload(b"Rar!\x1a\x07\x00", "data.rar")},
        format="multipart",
    )
    _bad(response, 400, "data.rar", ".zip")
    response = api.post(
        "/api/datasets/",
        {"name": "d", "format": "imagefolder", "archive": _upload(b"not a zip at all", "data.zip")},
        format="multipart",
    )
    _bad(response, 400, "not a valid zip")


def test_oversized_dataset_upload(api, nothing_left, settings):
    settings.FILE_UPLOAD_MAX_BYTES = 1000
    archive = _zip({"d/images/a.png": _png(8, 8), "d/notes.bin": __import__("os").urandom(4000)})
    response = api.post(
        "/api/datasets/", {"name": "d", "format": "imagefolder", "archive": archive}, format="multipart"
    )
    _bad(response, 413, "larger than 1000 bytes")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit greyscale PNG (a few KB even at 9000 x 9000: a decompression bomb)."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _zip(members: dict[str, bytes], name: str = "data.zip") -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    buffer.seek(0)
    buffer.name = name
    return buffer


BOMB = (9000, 9000)


def test_an_image_over_the_pixel_limit_is_refused(api, nothing_left):
    assert BOMB[0] * BOMB[1] > PIXEL_LIMIT
    archive = _zip({"folder/images/a.png": _png(*BOMB), "folder/images/b.png": _png(16, 16)})
    response = api.post(
        "/api/datasets/", {"name": "d", "format": "imagefolder", "archive": archive}, format="multipart"
    )
    _bad(response, 400, "a.png", "9000x9000", "over the limit")


@pytest.mark.parametrize("layout", ["imagefolder", "broden"])
def test_an_image_over_the_pixel_limit_anywhere_in_the_dataset_is_refused(api, media, layout):
    if layout == "imagefolder":
        members = {"d/images/a.png": _png(16, 16), "d/images/b.png": _png(16, 16), "d/images/c.png": _png(*BOMB)}
    else:
        members = {
            "d/index.csv": b"image,split,ih,iw,sh,sw,object\nok.png,train,16,16,8,8,\nc.png,train,16,16,8,8,\n",
            "d/label.csv": b"number,name,category,frequency,coverage,syns\n1,tree,object(1),1,1.0,\n",
            "d/category.csv": b"name,first,last,count,frequency\nobject,1,1,1,1\n",
            "d/images/ok.png": _png(16, 16),
            "d/images/c.png": _png(*BOMB),
        }
    response = api.post("/api/datasets/", {"name": "d", "format": layout, "archive": _zip(members)}, format="multipart")
    _bad(response, 400, "c.png", "over the limit")
    _assert_nothing_left(media)


def test_an_image_folder_archive_with_images_at_the_top_registers(api):
    archive = _zip({"images/a.png": _png(16, 16), "images/b.png": _png(16, 16)})
    response = api.post(
        "/api/datasets/",
        {"name": "top", "format": "imagefolder", "archive": archive, "concepts": "colors"},
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    assert response.json()["image_count"] == 2


# ---------------------------------------------------------------- jobs


@pytest.fixture()
def registered(user):
    """A model and a dataset as registration leaves them (rows made directly: no probe needed)."""
    from api.models import Dataset, NetworkModel

    layers = [
        {"name": "conv5", "type": "Conv2d", "units": 8, "height": 4, "width": 4},
        {"name": "fc", "type": "Linear", "units": 6, "height": 1, "width": 1},
    ]
    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x", layers=layers)
    dataset = Dataset.objects.create(owner=user, name="d", format="broden", path="/y")
    yield model, dataset
    from api.models import Job

    assert Job.objects.count() == 0


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        ({"layers": ["conv9", "conv5"]}, ["conv9", "conv5", "fc"]),
        ({"layers": "conv5"}, ["list of layer names"]),
        ({"quantile": 1.5}, ["quantile"]),
        ({"batch_size": 0}, ["batch_size"]),
        ({"max_images": -1}, ["max_images"]),
        ({"colour": True}, ["unknown params", "colour"]),
        ([1, 2], ["params"]),
    ],
)
def test_job_params_that_cannot_run(api, registered, params, needles):
    model, dataset = registered
    response = api.post(
        "/api/jobs/", {"type": "dissect", "model": model.pk, "dataset": dataset.pk, "params": params}, format="json"
    )
    _bad(response, 400, *needles)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"model": 1, "dataset": 1}, "type"),
        ({"type": "dissect", "dataset": 1}, "model"),
        ({"type": "dissect", "model": "one", "dataset": 1}, "model"),
    ],
)
def test_job_fields_missing_or_malformed(api, registered, payload, needle):
    _bad(api.post("/api/jobs/", payload, format="json"), 400, needle)


def test_job_on_a_model_that_does_not_exist(api, registered):
    _, dataset = registered
    response = api.post("/api/jobs/", {"type": "dissect", "model": 999999, "dataset": dataset.pk}, format="json")
    _bad(response, 404)


# ---------------------------------------------------------------- reads


def test_malformed_query_parameters(api):
    _bad(api.get("/api/concepts/?min_iou=lots"), 400, "min_iou")
    _bad(api.get("/api/units/?min_iou=lots"), 400, "min_iou")
    _bad(api.get("/api/units/?model=first"), 400, "model")


def test_matrix_of_an_unknown_layer_or_format(api, registered):
    from api.models import Job

    model, dataset = registered
    job = Job.objects.create(owner=model.owner, type="dissect", model=model, dataset=dataset, status="succeeded")
    _bad(api.get(f"/api/jobs/{job.pk}/matrix/?layer=conv5&as=xml"), 400, "csv or npz")
    _bad(api.get(f"/api/jobs/{job.pk}/matrix/?layer=conv9"), 404, "conv9")
    job.delete()

"""Loading torch.export archives (.pt2) without running code from the file."""

from __future__ import annotations

import builtins
import contextlib
import json
import pickle
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dissect_core.errors import ModelLoadError
from dissect_core.exported import ExportedNetwork, check_exported_archive, load_exported
from dissect_core.nethook import trace

SIZE = 64

# torch.load(weights_only=True) notes the protocol of the hostile pickles before refusing them.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


class Plant:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def archive(resnet: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = torch.randn(2, 3, SIZE, SIZE)
    program = torch.export.export(resnet, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path_factory.mktemp("pt2") / "resnet18.pt2"
    torch.export.save(program, path)
    return path


def rewrite(
    src: Path,
    dst: Path,
    *,
    replace: dict[str, bytes] | None = None,
    edit_json: dict[str, Callable[[dict], None]] | None = None,
    add: dict[str, bytes] | None = None,
    add_raw: dict[str, bytes] | None = None,
) -> Path:
    """Copy an archive, replacing members (paths relative to its root folder) or adding new ones."""
    replace, edit_json, add, add_raw = replace or {}, edit_json or {}, add or {}, add_raw or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename[len(root) + 1 :]
            data = zin.read(info)
            if rel in edit_json:
                doc = json.loads(data)
                edit_json[rel](doc)
                data = json.dumps(doc).encode()
            zout.writestr(info, replace.get(rel, data))
        for rel, data in add.items():
            zout.writestr(f"{root}/{rel}", data)
        for name, data in add_raw.items():
            zout.writestr(name, data)
    return dst


def first_node(doc: dict, target: str) -> dict:
    return next(n for n in doc["graph_module"]["graph"]["nodes"] if n["target"] == target)


def batch_expr(doc: dict) -> dict:
    return doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]


# ------------------------------------------------------------------------------------------------
# A real export loads, runs like the eager model and is hookable by name


def test_exported_resnet_matches_eager_model(resnet: nn.Module, archive: Path) -> None:
    check_exported_archive(archive)
    net = load_exported(archive)
    assert isinstance(net, ExportedNetwork)
    assert net.input_size == (SIZE, SIZE)
    assert net.dynamic_batch is True
    assert not net.module.training
    names = dict(net.module.named_modules())
    assert {"layer4", "layer3.1", "layer3.1.conv2", "fc"} <= set(names)
    torch.manual_seed(1)
    for batch in (1, 5):
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            got, want = net.module(x), resnet(x)
        assert got.shape == (batch, 10)
        torch.testing.assert_close(got, want)


def test_exported_layers_hook_like_eager_layers(resnet: nn.Module, archive: Path) -> None:
    net = load_exported(archive)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    layers = ["layer4", "layer3.1"]
    with torch.no_grad(), trace(net.module, layers) as got, trace(resnet, layers) as want:
        got(x)
        want(x)
    assert got["layer4"].shape == (3, 512, SIZE // 32, SIZE // 32)
    assert got["layer3.1"].shape == (3, 256, SIZE // 16, SIZE // 16)
    for name in layers:
        torch.testing.assert_close(got[name], want[name])
    # An output-editing hook (ablation) changes what follows it: with layer4 zeroed, the logits are fc's bias.
    with torch.no_grad(), trace(net.module, ["fc"], edit={"layer4": torch.zeros_like}) as ablated:
        ablated(x)
    torch.testing.assert_close(ablated["fc"], resnet.fc.bias.detach().expand(3, -1))


def test_extra_files_are_allowed(resnet: nn.Module, archive: Path, tmp_path: Path) -> None:
    path = rewrite(archive, tmp_path / "extra.pt2", add={"extra/notes.txt": b"trained on places365"})
    assert load_exported(path).input_size == (SIZE, SIZE)


# ------------------------------------------------------------------------------------------------
# Programs that load but cannot be dissected


def test_static_batch_export_is_refused(resnet: nn.Module, tmp_path: Path) -> None:
    program = torch.export.export(resnet, (torch.randn(2, 3, SIZE, SIZE),))
    torch.export.save(program, tmp_path / "static.pt2")
    check_exported_archive(tmp_path / "static.pt2")  # safe, just not usable
    with pytest.raises(ModelLoadError, match="dynamic") as info:
        load_exported(tmp_path / "static.pt2")
    assert 'Dim("batch")' in info.value.message
    assert "static batch size of 2" in info.value.message
    assert info.value.details["path"] == str(tmp_path / "static.pt2")


def test_bounded_batch_is_refused(archive: Path, tmp_path: Path) -> None:
    def cap(doc: dict) -> None:
        for bounds in doc["range_constraints"].values():
            bounds["max_val"] = 4

    path = rewrite(archive, tmp_path / "capped.pt2", edit_json={"models/model.json": cap})
    with pytest.raises(ModelLoadError, match=r"capped at 4.*dynamic"):
        load_exported(path)


def test_training_mode_export_is_refused(archive: Path, tmp_path: Path) -> None:
    def train(doc: dict) -> None:
        node = first_node(doc, "torch.ops.aten.batch_norm.default")
        next(a for a in node["inputs"] if a["name"] == "training")["arg"] = {"as_bool": True}

    path = rewrite(archive, tmp_path / "train.pt2", edit_json={"models/model.json": train})
    with pytest.raises(ModelLoadError, match=r"training mode.*model\.eval\(\)"):
        load_exported(path)


def test_two_inputs_or_non_image_input_is_refused(tmp_path: Path) -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    batch = torch.export.Dim("batch")
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(Two(), (x, x), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, tmp_path / "two.pt2")
    with pytest.raises(ModelLoadError, match="takes 2 inputs"):
        load_exported(tmp_path / "two.pt2")

    vector = torch.export.export(nn.Linear(5, 2), (torch.randn(2, 5),), dynamic_shapes=({0: batch},))
    torch.export.save(vector, tmp_path / "vector.pt2")
    with pytest.raises(ModelLoadError, match=r"not an image batch \[B, 3, H, W\]"):
        load_exported(tmp_path / "vector.pt2")


def test_undeserializable_program_is_a_load_error(archive: Path, tmp_path: Path) -> None:
    def drop_nodes(doc: dict) -> None:
        doc["graph_module"]["graph"]["nodes"] = doc["graph_module"]["graph"]["nodes"][:3]

    path = rewrite(archive, tmp_path / "broken.pt2", edit_json={"models/model.json": drop_nodes})
    with pytest.raises(ModelLoadError, match="torch could not load the exported program"):
        load_exported(path)


# ------------------------------------------------------------------------------------------------
# Hostile archives: refused, and nothing in them ever runs


def _pickled_weight(archive: Path, dst: Path, marker: Path) -> Path:
    def to_pickle(doc: dict) -> None:
        doc["config"]["conv1.weight"]["use_pickle"] = True

    with zipfile.ZipFile(archive) as zf:
        config = json.loads(next(zf.read(n) for n in zf.namelist() if n.endswith("model_weights_config.json")))
    payload = config["config"]["conv1.weight"]["path_name"]
    return rewrite(
        archive,
        dst,
        edit_json={"data/weights/model_weights_config.json": to_pickle},
        replace={f"data/weights/{payload}": pickle.dumps(Plant(marker))},
    )


def _sample_inputs_pickle(archive: Path, dst: Path, marker: Path) -> Path:
    return rewrite(archive, dst, replace={"data/sample_inputs/model.pt": pickle.dumps(Plant(marker))})


def _custom_object(archive: Path, dst: Path, marker: Path) -> Path:
    def add_obj(doc: dict) -> None:
        doc["config"]["obj"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}

    return rewrite(
        archive,
        dst,
        edit_json={"data/constants/model_constants_config.json": add_obj},
        add={"data/constants/custom_obj_0": pickle.dumps(Plant(marker))},
    )


def _legacy_weights(archive: Path, dst: Path, marker: Path) -> Path:
    return rewrite(archive, dst, add={"data/weights/model.pt": pickle.dumps(Plant(marker))})


def _aotinductor(archive: Path, dst: Path, marker: Path) -> Path:
    return rewrite(archive, dst, add={"data/aotinductor/model/model.wrapper.so": b"\x7fELF" + bytes(64)})


def _escape(archive: Path, dst: Path, marker: Path) -> Path:
    return rewrite(archive, dst, add_raw={"../escape": b"x"})


def _not_zip(archive: Path, dst: Path, marker: Path) -> Path:
    dst.write_text("this is a text file, not an exported program\n")
    return dst


def _random_bytes(archive: Path, dst: Path, marker: Path) -> Path:
    dst.write_bytes(random.Random(0).randbytes(4096))
    return dst


def _sympy_eval(archive: Path, dst: Path, marker: Path) -> Path:
    def inject(doc: dict) -> None:
        expr = batch_expr(doc)
        expr["expr_str"] = f"__import__('builtins').open({str(marker)!r}, 'w') and {expr['expr_str']}"

    return rewrite(archive, dst, edit_json={"models/model.json": inject})


def _guard_code(archive: Path, dst: Path, marker: Path) -> Path:
    def inject(doc: dict) -> None:
        doc["guards_code"] = [f"__import__('builtins').open({str(marker)!r}, 'w') is not None"]

    return rewrite(archive, dst, edit_json={"models/model.json": inject})


def _file_reading_op(archive: Path, dst: Path, marker: Path) -> Path:
    def inject(doc: dict) -> None:
        first_node(doc, "torch.ops.aten.relu_.default")["target"] = "torch.ops.aten.from_file.default"

    return rewrite(archive, dst, edit_json={"models/model.json": inject})


def _python_callable(archive: Path, dst: Path, marker: Path) -> Path:
    def inject(doc: dict) -> None:
        first_node(doc, "torch.ops.aten.relu_.default")["target"] = "torch.os.system"

    return rewrite(archive, dst, edit_json={"models/model.json": inject})


def _importing_treespec(archive: Path, dst: Path, marker: Path) -> Path:
    def inject(doc: dict) -> None:
        context = {"default_factory_module": "antigravity", "default_factory_name": "geohash", "dict_context": []}
        spec = {"type": "collections.defaultdict", "context": json.dumps(context), "children_spec": []}
        doc["graph_module"]["module_call_graph"][0]["signature"]["out_spec"] = json.dumps([1, spec])

    return rewrite(archive, dst, edit_json={"models/model.json": inject})


def _rename(obj: object, old: str, new: str) -> object:
    if isinstance(obj, dict):
        return {(new if k == old else k): _rename(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename(v, old, new) for v in obj]
    return new if obj == old else obj


def _name_injection(archive: Path, dst: Path, marker: Path) -> Path:
    # torch.fx writes getattr(self.fc, "<segment>") unescaped into the forward code of ExportedProgram.module().
    hexpath = str(marker).encode().hex()
    evil = f'fc.w") if open(getattr(bytes,"fromhex")("{hexpath}"),"w") is None else getattr(self,"x'

    def inject(doc: dict) -> None:
        renamed = _rename(doc, "fc.weight", evil)
        assert isinstance(renamed, dict)
        doc.clear()
        doc.update(renamed)

    configs = {"models/model.json": inject, "data/weights/model_weights_config.json": inject}
    return rewrite(archive, dst, edit_json=configs)


def _bomb(archive: Path, dst: Path, marker: Path) -> Path:
    rewrite(archive, dst)
    with zipfile.ZipFile(dst, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        zf.writestr(f"{root}/extra/zeros", bytes(8 << 20))
    return dst


HOSTILE: dict[str, tuple[Callable[[Path, Path, Path], Path], str]] = {
    "pickled-weight": (_pickled_weight, r"conv1\.weight' is stored as a pickle"),
    "sample-inputs-pickle": (_sample_inputs_pickle, r"sample inputs .* are not plain tensors"),
    "custom-object": (_custom_object, r"custom/opaque object"),
    "legacy-weights": (_legacy_weights, r"legacy pickled weights"),
    "aotinductor": (_aotinductor, r"AOTInductor compiled code or a native library"),
    "path-escape": (_escape, r"'\.\./escape' has an unsafe path"),
    "not-a-zip": (_not_zip, r"not a zip archive"),
    "random-bytes": (_random_bytes, r"not a zip archive"),
    "sympy-eval": (_sympy_eval, r"symbolic size .* not plain arithmetic"),
    "guard-code": (_guard_code, r"guard code"),
    "file-reading-op": (_file_reading_op, r"from_file.*reads or writes files"),
    "python-callable": (_python_callable, r"calls 'torch\.os\.system'"),
    "importing-treespec": (_importing_treespec, r"container type 'collections\.defaultdict'"),
    "name-injection": (_name_injection, r"weight name .* is not a dotted name"),
    "decompression-bomb": (_bomb, r"decompression bomb"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_archive_is_refused_without_running_it(kind: str, archive: Path, tmp_path: Path) -> None:
    build, message = HOSTILE[kind]
    marker = tmp_path / "planted"
    path = build(archive, tmp_path / f"{kind}.pt2", marker)
    for load in (check_exported_archive, load_exported):
        with pytest.raises(ModelLoadError, match=message) as info:
            load(path)
        assert info.value.details["path"] == str(path)
        assert not marker.exists(), f"{kind}: code from the archive ran"


@pytest.mark.parametrize("kind", ["sample-inputs-pickle", "pickled-weight", "sympy-eval", "name-injection"])
def test_plain_torch_export_load_runs_the_payload(kind: str, archive: Path, tmp_path: Path) -> None:
    """The refusals above guard a real hole: torch's own loader executes these payloads."""
    marker = tmp_path / "planted"
    path = HOSTILE[kind][0](archive, tmp_path / f"{kind}.pt2", marker)
    with contextlib.suppress(Exception):  # torch fails after the payload has run
        program = torch.export.load(path)
        program.module()(torch.randn(1, 3, SIZE, SIZE))  # name-injection runs here
    assert marker.exists(), f"torch.export.load no longer runs the {kind} payload: update the module docstring"

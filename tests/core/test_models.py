"""Loading models safely, listing layers, and tracing them."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from dissect_core.errors import DissectError, LayerError, ModelLoadError
from dissect_core.models import (
    IMAGENET_MEAN,
    infer_num_classes_from_state_dict,
    list_layers,
    load_model,
    load_state_dict_file,
)
from dissect_core.nethook import trace


class PlantFile:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


def test_safetensors_round_trip_and_inferred_classes(tmp_path: Path, resnet: nn.Module) -> None:
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(path))
    loaded = load_model("torchvision:resnet18", path, input_size=64)
    assert loaded.num_classes == 7 and loaded.kind == "torchvision" and loaded.input_size == (64, 64)
    assert loaded.mean == IMAGENET_MEAN and not loaded.module.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), resnet(x))


def test_pt_wrappers_and_module_prefix(tmp_path: Path, resnet: nn.Module) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, path)
    loaded = load_model("torchvision:resnet18", path, 7)
    torch.testing.assert_close(loaded.module.fc.weight, resnet.fc.weight)
    assert infer_num_classes_from_state_dict(torch.load(path, weights_only=True)) == 7


def test_wrong_weights_name_missing_unexpected_and_mismatched_keys(tmp_path: Path, resnet: nn.Module) -> None:
    state = dict(resnet.state_dict())
    state.pop("layer4.1.conv2.weight")
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_model("torchvision:resnet18", path, num_classes=10)
    message = err.value.message
    assert "layer4.1.conv2.weight" in message and "extra.weight" in message and "fc.weight" in message
    assert err.value.details["missing"] == ["layer4.1.conv2.weight"]
    assert err.value.details["unexpected"] == ["extra.weight"]
    assert any(m.startswith("fc.weight") for m in err.value.details["mismatched"])


def test_truncated_and_corrupt_files(tmp_path: Path, resnet: nn.Module) -> None:
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model("torchvision:resnet18", cut)
    pt = tmp_path / "good.pt"
    torch.save(resnet.state_dict(), pt)
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes(pt.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model("torchvision:resnet18", cut_pt)
    garbage = tmp_path / "noise.bin"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ModelLoadError):
        load_state_dict_file(garbage)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_state_dict_file(tmp_path / "absent.pt")
    with pytest.raises(ModelLoadError, match="empty"):
        (tmp_path / "empty.pt").write_bytes(b"")
        load_state_dict_file(tmp_path / "empty.pt")


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": PlantFile(marker)}, zipped)
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"w": PlantFile(marker)}, f)
    for path in (zipped, legacy):
        with pytest.raises(ModelLoadError, match=r"refusing|unreadable"):
            load_model("torchvision:resnet18", path)
        assert not marker.exists()


def test_builtin_and_unknown_specs(tmp_path: Path) -> None:
    from dissect_core.archs import ARCHS

    net = ARCHS["scenecnn"](5)
    path = tmp_path / "scene.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_model("builtin:scenecnn", path, input_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert loaded.num_classes == 5 and loaded.kind == "builtin" and loaded.std == (0.25, 0.25, 0.25)
    layers = {info.name: info for info in list_layers(loaded)}
    assert (layers["conv5"].units, layers["conv5"].height, layers["conv5"].width) == (128, 8, 8)
    for spec in ("builtin:nope", "torchvision:not_a_net", "keras:vgg", "resnet18"):
        with pytest.raises(ModelLoadError):
            load_model(spec, num_classes=3)
    with pytest.raises(ModelLoadError, match="num_classes"):
        load_model("builtin:scenecnn")


def test_list_layers_resnet(resnet: nn.Module) -> None:
    infos = list_layers(resnet, input_size=64)
    by_name = {i.name: i for i in infos}
    assert (by_name["layer4"].units, by_name["layer4"].height) == (512, 2)
    assert by_name["conv1"].type == "Conv2d" and by_name["layer1.0"].type == "BasicBlock"
    assert by_name["fc"].kind == "vector" and by_name["fc"].units == resnet.fc.out_features  # 1 x 1 maps
    assert [i.name for i in infos].index("layer1") < [i.name for i in infos].index("layer4")
    assert not resnet._forward_hooks and not resnet.layer1._forward_hooks


def test_trace_records_edits_stops_and_cleans_up(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    fc_calls = []
    handle = resnet.fc.register_forward_pre_hook(lambda m, i: fc_calls.append(1))
    resnet.train()
    try:
        with torch.no_grad(), trace(resnet, ["layer3", "layer2"], stop_after_last=True) as tr:
            assert tr(x) is None
        assert tr["layer3"].shape == (2, 256, 4, 4) and tr["layer2"].shape == (2, 128, 8, 8)
        assert not fc_calls and resnet.training
        assert not resnet.layer3._forward_hooks
        with torch.no_grad():
            resnet.eval()
            plain = resnet(x)

            def zero_unit(out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                out[:, :256] = 0
                return out

            with trace(resnet, ["layer4"], edit={"layer4": zero_unit}) as tr:
                edited = tr(x)
            assert (tr["layer4"][:, :256] == 0).all()
            assert not torch.allclose(plain, edited)
            torch.testing.assert_close(resnet(x), plain)
    finally:
        handle.remove()
    with pytest.raises(LayerError) as err, trace(resnet, ["layer9"]):
        pass
    assert "layer4.1.conv2" in err.value.details["valid"] and "layer4.1.conv2" in err.value.message


def test_trace_copies_outputs_that_later_ops_change_in_place() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad(), trace(net, ["1", "3"]) as tr:
        tr(x)
    assert (tr["1"] < 0).any()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_models(tmp_path: Path, resnet: nn.Module, how: str) -> None:
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.jit.script(resnet) if how == "script" else torch.jit.trace(resnet, x)
    path = tmp_path / "model.pt"
    torch.jit.save(compiled, str(path))
    loaded = load_model("torchscript", path, input_size=64)
    assert loaded.kind == "torchscript"
    names = ["layer3", "layer1.0.bn1", "layer2"]
    with torch.no_grad(), trace(resnet.eval(), names) as eager:
        expected = eager(x)
    with torch.no_grad(), trace(loaded.module, names) as scripted:
        got = scripted(x)
    torch.testing.assert_close(got, expected)
    for name in names:
        torch.testing.assert_close(scripted[name], eager[name])
    assert (scripted["layer1.0.bn1"] < 0).any()
    by_name = {i.name: i for i in list_layers(loaded)}
    assert (by_name["layer4"].units, by_name["layer4"].height) == (512, 2)
    with (
        pytest.raises(DissectError, match="TorchScript"),
        trace(loaded.module, ["layer4"], edit={"layer4": lambda t: t}),
    ):
        pass
    bad = tmp_path / "not_script.pt"
    torch.save(resnet.state_dict(), bad)
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model("torchscript", bad)

"""Known answers for layers that are not [B, C, H, W] maps: transformer tokens, channels-last maps
and vectors are dissected exactly as the same values laid out as a map, and a token layer's units
are ablated on its patch tokens only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dissect import SquaresDataset, Units, copy_model
from torch import nn

from dissect_core.ablation import balanced_accuracy, class_predictions, unit_importance, zero_units
from dissect_core.dissect import dissect
from dissect_core.errors import LayerError
from dissect_core.models import LoadedModel, layer_layouts, list_layers
from dissect_core.upsample import upsample_numpy


class Shapes(nn.Module):
    """CopyNet's five 8x8 unit maps (colour squares, a constant, a pattern), emitted in every layout:
    ``tokens`` [B, 1 + 64, 5] after a class token of 9s (a transformer's; the model declares its 2x2
    patches), ``last`` [B, 8, 8, 5], ``vector`` [B, 5] (the maps' means) and ``pooled`` [B, 5, 1, 1]
    (the same means as a 1 x 1 map)."""

    def __init__(self) -> None:
        super().__init__()
        self.units = Units()
        self.patch_embed = nn.Identity()
        self.patch_embed.patch_size = (2, 2)
        self.num_prefix_tokens = 1
        self.cls_token = nn.Parameter(torch.full((1, 1, 5), 9.0))
        self.tokens = nn.Identity()
        self.last = nn.Identity()
        self.vector = nn.Identity()
        self.pooled = nn.Identity()
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.units(x)
        b = maps.shape[0]
        self.tokens(torch.cat([self.cls_token.expand(b, -1, -1), maps.flatten(2).transpose(1, 2)], dim=1))
        self.last(maps.permute(0, 2, 3, 1))
        self.pooled(maps.mean(dim=(2, 3), keepdim=True))
        return self.head(self.vector(maps.mean(dim=(2, 3))))


def shapes_model() -> LoadedModel:
    return LoadedModel(Shapes().eval(), "test:shapes", 2, (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "builtin")


def numpy_iou(acts: np.ndarray, ds: SquaresDataset, q: float) -> np.ndarray:
    """IoU [U, C] by hand: upsample (numpy), hazen quantile, dataset-level intersections and unions."""
    up = upsample_numpy(acts.astype(np.float64), ds.mask_size)
    t = np.quantile(up.transpose(1, 0, 2, 3).reshape(up.shape[1], -1), q, axis=1, method="hazen")
    on = up > t[None, :, None, None]
    present = np.zeros((len(ds), len(ds.concepts), *ds.mask_size), dtype=bool)
    for i in range(len(ds)):
        s = ds[i]
        for k in range(s.label_maps.shape[0]):
            for c in range(1, len(ds.concepts) + 1):
                present[i, c - 1] |= s.label_maps[k] == c
        for c in s.image_labels:
            present[i, c - 1] = True
    inter = np.einsum("buyx,bcyx->uc", on.astype(np.int64), present.astype(np.int64))
    union = on.sum(axis=(0, 2, 3))[:, None] + present.sum(axis=(0, 2, 3))[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def test_listing_finds_every_layout_of_the_same_units() -> None:
    infos = {i.name: i for i in list_layers(shapes_model())}
    assert (infos["tokens"].kind, infos["tokens"].units, infos["tokens"].height, infos["tokens"].prefix) == (
        "tokens",
        5,
        8,
        ("class",),
    )
    assert (infos["last"].kind, infos["last"].height, infos["last"].width) == ("channels_last", 8, 8)
    assert (infos["vector"].kind, infos["pooled"].kind) == ("vector", "map")


def test_tokens_and_channels_last_dissect_exactly_like_the_map() -> None:
    """A unit that fires exactly on the patches of a drawn square gets that square with IoU 1; every
    number equals the map layer's (CopyNet ``units``) and the hand computation."""
    ds = SquaresDataset()
    want = dissect(copy_model(), ds, ["units"], quantile=0.75, batch_size=5, device="cpu")["units"]
    got = dissect(shapes_model(), ds, ["tokens", "last"], quantile=0.75, batch_size=5, device="cpu")
    for layer in ("tokens", "last"):
        result = got[layer]
        assert [(lab.concept, lab.iou) for lab in result.labels[:3]] == [
            ("red-square", 1.0),
            ("green-square", 1.0),
            ("blue-square", 1.0),
        ], layer
        np.testing.assert_array_equal(result.thresholds, want.thresholds)
        np.testing.assert_array_equal(result.iou, want.iou)
    acts = torch.stack(
        [Units()(torch.from_numpy(ds[i].image).permute(2, 0, 1)[None].float() / 255)[0] for i in range(len(ds))]
    ).numpy()
    np.testing.assert_allclose(got["tokens"].iou, numpy_iou(acts, ds, 0.75), atol=1e-12)


def test_a_vector_is_a_layer_of_1x1_maps() -> None:
    """A [B, C] layer is dissected as [B, C, 1, 1] maps: the same numbers as a pooled 1 x 1 map layer,
    and as the hand computation on those maps."""
    ds = SquaresDataset()
    got = dissect(shapes_model(), ds, ["vector", "pooled"], quantile=0.6, batch_size=7, device="cpu")
    np.testing.assert_array_equal(got["vector"].iou, got["pooled"].iou)
    np.testing.assert_array_equal(got["vector"].thresholds, got["pooled"].thresholds)
    means = np.stack([ds[i].image.astype(np.float64).mean(axis=(0, 1)) / 255 for i in range(len(ds))])
    acts = np.concatenate([means, np.ones((len(ds), 1)), np.zeros((len(ds), 1))], axis=1)
    acts[:, 4] = Units().pattern.numpy().astype(np.float64).mean()
    np.testing.assert_allclose(got["vector"].iou, numpy_iou(acts[:, :, None, None], ds, 0.6), atol=1e-6)


class TokenClassifier(nn.Module):
    """A transformer-like classifier: 4x4 patches -> tokens (a class token first) -> ``block``
    (a Linear) -> logits from the class token and the mean of the patch tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.patch_embed = nn.Conv2d(3, 6, 4, stride=4)
        self.patch_embed.patch_size = (4, 4)
        self.num_prefix_tokens = 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6))
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = self.block(torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1))
        return self.head(torch.cat([t[:, 0], t[:, 1:].mean(dim=1)], dim=1))


def test_ablating_a_token_unit_zeroes_it_on_the_patch_tokens_only() -> None:
    model = LoadedModel(TokenClassifier().eval(), "test:tokens", 2, (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    layout = layer_layouts(model, ["block"])["block"]
    out = model.module.block(torch.randn(2, 17, 6))
    edited = zero_units([1, 4], layout)(out)
    assert torch.equal(edited[:, 0], out[:, 0]) and edited[:, 1:, [1, 4]].abs().sum() == 0
    assert torch.equal(edited[:, 1:, [0, 2, 3, 5]], out[:, 1:, [0, 2, 3, 5]])
    ds = SquaresDataset(n=40, seed=2)
    importance = unit_importance(model, ds, "block", batch_size=8, device="cpu")
    # Brute force: each unit zeroed on the patch tokens by a hook, the whole network run.
    for u in range(6):
        logits, labels = class_predictions(model, ds, edit={"block": zero_units([u], layout)}, device="cpu")
        pred = logits.argmax(dim=1)
        for c in range(2):
            assert importance.balanced_accuracy[u, c] == pytest.approx(balanced_accuracy(pred, labels, c)), (u, c)


class _Sum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class _Scalar(nn.Module):
    """A network whose layer ``inner`` outputs one number for the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_layer_that_cannot_be_laid_out_says_why() -> None:
    model = LoadedModel(_Scalar().eval(), "test:scalar", 2, (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    problems: dict[str, str] = {}
    assert list_layers(model, problems=problems) == [] and "outputs ()" in problems["inner"]
    with pytest.raises(LayerError, match="laid out as unit maps"):
        layer_layouts(model, ["inner"])
    with pytest.raises(LayerError, match="laid out as unit maps"):
        dissect(model, SquaresDataset(n=4), ["inner"], device="cpu")


def test_an_exported_cnn_dissects_exactly_like_the_same_torchvision_cnn(tmp_path) -> None:
    """The same resnet18 weights as ``torchvision:resnet18`` and as a torch.export .pt2 archive: the same
    layers, thresholds and IoU."""
    import torchvision
    from safetensors.torch import save_file

    from dissect_core.models import load_model

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    program = torch.export.export(net, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "r18.pt2"))
    native = load_model("torchvision:resnet18", tmp_path / "r18.safetensors", input_size=32)
    exported = load_model("exported", tmp_path / "r18.pt2")
    assert exported.input_size == (32, 32) and exported.num_classes == 2
    assert [(i.name, i.type, i.units, i.kind) for i in list_layers(exported)] == [
        (i.name, i.type, i.units, i.kind) for i in list_layers(native)
    ]
    ds = SquaresDataset(n=12)
    want = dissect(native, ds, ["layer3", "fc"], quantile=0.9, batch_size=5, device="cpu")
    got = dissect(exported, ds, ["layer3", "fc"], quantile=0.9, batch_size=5, device="cpu")
    for layer in ("layer3", "fc"):
        np.testing.assert_allclose(got[layer].thresholds, want[layer].thresholds, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[layer].iou, want[layer].iou, atol=1e-6)
        assert [lab.concept for lab in got[layer].labels] == [lab.concept for lab in want[layer].labels]


def test_a_timm_vision_transformer_block_and_mlp_are_dissected() -> None:
    from dissect_core.models import load_model

    torch.manual_seed(0)
    vit = load_model("timm:vit_tiny_patch16_224", num_classes=2, input_size=32)
    assert vit.mean == (0.5, 0.5, 0.5)  # timm's own configuration
    results = dissect(vit, SquaresDataset(n=6), ["blocks.1", "blocks.1.mlp.act"], batch_size=3, device="cpu")
    assert results["blocks.1"].iou.shape == (192, 4) and results["blocks.1.mlp.act"].iou.shape == (768, 4)
    assert vit.layouts["blocks.1"].prefix == ("class",) and vit.layouts["blocks.1"].height == 2

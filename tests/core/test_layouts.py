"""Layers of any shape laid out as unit maps: token grids, channels-last maps, vectors, tuples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dissect_core.errors import LayerError
from dissect_core.layouts import LayerLayout, TokenGrid, infer_layout, model_token_grid
from dissect_core.models import LoadedModel, layer_layouts, list_layers


def test_tokens_are_laid_out_row_major_after_the_prefix() -> None:
    b, gh, gw, c = 2, 3, 4, 5
    maps = torch.arange(b * c * gh * gw, dtype=torch.float32).reshape(b, c, gh, gw)
    cls = torch.full((b, 1, c), -7.0)
    tokens = torch.cat([cls, maps.flatten(2).transpose(1, 2)], dim=1)  # token 1 + r*W + c -> (r, c)
    layout = infer_layout("blocks.0", tokens, batch=b, input_size=(48, 64), grid=TokenGrid((gh, gw), ("class",)))
    assert (layout.kind, layout.units, layout.height, layout.width, layout.prefix) == ("tokens", c, gh, gw, ("class",))
    assert torch.equal(layout.to_map(tokens), maps)
    assert tokens[0, 1 + 2 * gw + 3, 4] == maps[0, 4, 2, 3]
    zeroed = layout.edit(lambda m: m * torch.tensor([1.0, 0, 1, 1, 1]).view(1, c, 1, 1))(tokens)
    assert torch.equal(zeroed[:, 0], cls[:, 0])  # the class token is left as it is
    assert zeroed[:, 1:, 1].abs().sum() == 0 and torch.equal(zeroed[:, 1:, 0], tokens[:, 1:, 0])
    assert "class token excluded" in layout.describe() and "3 x 4" in layout.describe()


def test_channels_last_vectors_and_tuples() -> None:
    x = torch.randn(2, 6, 6, 10)
    last = infer_layout("norm", x, batch=2, input_size=(224, 224))
    assert (last.kind, last.units, last.height, last.width) == ("channels_last", 10, 6, 6)
    assert torch.equal(last.to_map(x), x.permute(0, 3, 1, 2))
    assert torch.equal(last.from_map(last.to_map(x), x), x)
    square = infer_layout("conv", torch.randn(2, 6, 6, 6), batch=2, input_size=(224, 224))
    assert square.kind == "map"
    # A wider probe decides even when the shape alone would not: the width follows the input.
    told = infer_layout("conv", torch.randn(2, 6, 6, 6), batch=2, input_size=(224, 224), wider=(2, 6, 7, 6))
    assert told.kind == "channels_last"
    v = torch.randn(2, 7)
    vec = infer_layout("fc", v, batch=2, input_size=(224, 224))
    assert (vec.kind, vec.units, vec.height, vec.width) == ("vector", 7, 1, 1)
    assert vec.to_map(v).shape == (2, 7, 1, 1) and torch.equal(vec.from_map(vec.to_map(v), v), v)
    pair = (torch.randn(2, 5, 3), torch.randn(2, 5, 5))
    grid = TokenGrid((2, 2), ("class",))
    tup = infer_layout("attn", pair, batch=2, input_size=(32, 32), grid=grid)
    assert tup.element == 0 and tup.kind == "tokens" and tup.units == 3
    edited = tup.edit(lambda m: m * 0)(pair)
    assert isinstance(edited, tuple) and edited[1] is pair[1] and edited[0][:, 1:].abs().sum() == 0


@pytest.mark.parametrize(
    ("output", "needle"),
    [
        (torch.randn(2), "only [B, C]"),
        (torch.randn(3, 4), "batch is not its first dimension"),
        ((1, "a"), "no tensor"),
        ("text", "not a tensor"),
        (torch.randn(2, 1, 2, 3, 4), "only [B, C]"),
        (torch.randn(2, 2, 4), "fill no patch grid"),
    ],
)
def test_outputs_that_cannot_be_maps_name_the_problem(output, needle) -> None:
    with pytest.raises(LayerError, match="laid out as unit maps") as info:
        infer_layout("odd", output, batch=2, input_size=(16, 48))
    assert needle in info.value.message


def test_token_counts_must_match_the_models_grid() -> None:
    grid = TokenGrid((4, 4), ("class",))
    assert infer_layout("x", torch.randn(2, 16, 8), batch=2, input_size=(64, 64), grid=grid).prefix == ()
    with pytest.raises(LayerError, match="match no layout of the model's 4 x 4 patch grid"):
        infer_layout("x", torch.randn(2, 20, 8), batch=2, input_size=(64, 64), grid=grid)
    guessed = infer_layout("x", torch.randn(2, 1 + 8 * 4, 8), batch=2, input_size=(64, 32))
    assert (guessed.height, guessed.width, len(guessed.prefix)) == (8, 4, 1)


class TinyViT(nn.Module):
    """A transformer-like module: 4x4 patches, a class token and two register tokens, one block."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.patch_embed.patch_size = (4, 4)  # as timm declares it
        self.num_prefix_tokens = 3
        self.num_reg_tokens = 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, 2, dim))
        self.block = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        b = t.shape[0]
        t = torch.cat([self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), t], dim=1)
        t = t + self.block(t)
        return self.head(t[:, 0])


def test_listing_reads_the_grid_and_prefix_from_the_model() -> None:
    model = LoadedModel(TinyViT().eval(), "test:tinyvit", 3, (16, 24))
    grid = model_token_grid(model.module, (16, 24))
    assert grid == TokenGrid((4, 6), ("class", "register", "register"))
    problems: dict[str, str] = {}
    infos = {i.name: i for i in list_layers(model, problems=problems)}
    assert infos["block.1"].kind == "tokens" and infos["block.1"].units == 12
    assert (infos["block"].height, infos["block"].width, infos["block"].prefix) == (
        4,
        6,
        ("class", "register", "register"),
    )
    assert infos["patch_embed"].kind == "map" and infos["head"].kind == "vector"
    assert layer_layouts(model, ["block"])["block"] == infos["block"].layout
    with pytest.raises(LayerError, match=r"no module named|not a module|unknown"):
        layer_layouts(model, ["nope"])


def test_torchvision_and_timm_transformers_are_listed_with_their_tokens() -> None:
    import torchvision

    vit = LoadedModel(
        torchvision.models.vit_b_16(image_size=32, num_classes=3).eval(), "torchvision:vit_b_16", 3, (32, 32)
    )
    infos = {i.name: i for i in list_layers(vit)}
    block = infos["encoder.layers.encoder_layer_1"]
    assert (block.kind, block.units, block.height, block.width, block.prefix) == ("tokens", 768, 2, 2, ("class",))
    assert infos["encoder.layers.encoder_layer_1.mlp.1"].units == 3072
    attn = infos["encoder.layers.encoder_layer_1.self_attention"]
    assert attn.element == 0 and attn.kind == "tokens"
    swin = LoadedModel(torchvision.models.swin_t(num_classes=3).eval(), "torchvision:swin_t", 3, (64, 64))
    sinfos = {i.name: i for i in list_layers(swin)}
    assert (sinfos["features.1"].kind, sinfos["features.1"].units, sinfos["features.1"].height) == (
        "channels_last",
        96,
        16,
    )
    assert sinfos["permute"].kind == "map"


def test_layout_round_trips_through_its_dict() -> None:
    layout = LayerLayout("tokens", 8, 2, 3, ("class",), None)
    assert layout.as_dict() == {"kind": "tokens", "prefix": ["class"], "element": None}


def test_layout_is_read_back_from_its_registration_row() -> None:
    layout = LayerLayout("tokens", 8, 2, 3, ("class",), 0)
    row = {"name": "x", "units": 8, "height": 2, "width": 3, **layout.as_dict()}
    assert LayerLayout.from_row(row) == layout
    assert LayerLayout.from_row({"units": 4, "height": 5, "width": 5}) == LayerLayout("map", 4, 5, 5)

"""Single-unit ablation as rank-one updates equals brute force: each unit zeroed, the whole network run.

Random weights, small inputs; the layers the method names (shufflenet ``stage4`` and
``conv5``, resnet18 ``layer3`` and ``layer4``, vgg16 ``features.28``), a vector layer
with an MLP after it, and networks whose suffix has no linear operation first (no plan:
the batched suffix runs as before, with the same results).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from dissect_core.ablation import (
    AblationCounts,
    ablation_counts,
    class_predictions,
    split_network,
    unit_ablations,
    zero_units,
)
from dissect_core.concepts import Concept, ConceptDataset, Sample
from dissect_core.models import LoadedModel
from dissect_core.rankone import rank_one_plan
from dissect_core.surgery import outputs_match, prefix

torchvision = pytest.importorskip("torchvision")


class Noise(ConceptDataset):
    """Random images with random classes."""

    name = "noise"
    mask_size = (4, 4)
    concepts: ClassVar[list[Concept]] = [Concept(1, "thing", "object")]
    categories: ClassVar[list[str]] = ["object"]

    def __init__(self, n: int, size: int, classes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.image_size = (size, size)
        self.pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.labels = rng.integers(0, classes, n)
        self.classes = [str(c) for c in range(classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        return Sample(self.pixels[index], np.zeros((0, 4, 4), np.int32), class_label=int(self.labels[index]))


def torchvision_model(arch: str, size: int, classes: int = 5) -> LoadedModel:
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=classes).eval()
    # random running statistics, so BatchNorm is not the identity it is at initialisation
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return LoadedModel(net, f"torchvision:{arch}", classes, (size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def brute_force(model: LoadedModel, data: ConceptDataset, layer: str, units: list[int]) -> list[torch.Tensor]:
    """The whole network on every image, once per unit, with that unit zeroed by a hook."""
    return [class_predictions(model, data, batch_size=8, device="cpu", edit={layer: zero_units([u])})[0] for u in units]


def assert_rank_one_equals_brute_force(
    model: LoadedModel,
    layer: str,
    *,
    direct: bool | None = None,
    every: int = 1,
    memory_format: torch.memory_format | None = None,
) -> None:
    """The plan's logits against the suffix on zeroed maps (every ``every``-th unit) and the whole
    network (three units), and the sweep's counts against the counts of the whole network's logits;
    with ``memory_format``, the plan's convolutions after the linear operations run in it rather
    than in the one the plan measured faster."""
    data = Noise(6, model.input_size[0], model.num_classes or 5)
    split = split_network(model, layer, device="cpu")
    assert split.plan is not None, f"{layer}: no rank-one plan ({split.kind} split)"
    if memory_format is not None:
        split.plan.use_memory_format(memory_format)
    if direct is not None:
        assert split.plan.direct == direct
    units = split.units
    sample = [0, units // 3, units - 1]
    want = brute_force(model, data, layer, sample)
    base, labels = class_predictions(model, data, batch_size=8, device="cpu")

    # the plan's logits, every unit, against the suffix run on zeroed maps and (sampled) the whole network
    images = torch.stack([torch.from_numpy(data[i].image).permute(2, 0, 1) for i in range(len(data))])
    from dissect_core.dissect import preprocess_images

    with torch.no_grad():
        a = prefix(model.module, layer, preprocess_images(images, model.input_size, model.mean, model.std))
        got = split.plan.logits(a, torch.arange(-1, units))
        assert split.suffix is not None
        assert outputs_match(got[0], base)
        for first in range(0, units, 128 * every):
            chunk = torch.arange(first, min(units, first + 128 * every), every)
            zeroed = a.unsqueeze(0).repeat(len(chunk), *([1] * a.dim()))
            zeroed[torch.arange(len(chunk)), :, chunk] = 0
            out = split.suffix(zeroed.flatten(0, 1)).view(len(chunk), a.shape[0], -1)
            for i, u in enumerate(chunk.tolist()):
                assert outputs_match(got[1 + u], out[i]), f"{layer} unit {u}"
    for u, full in zip(sample, want, strict=True):
        assert outputs_match(got[1 + u], full), f"{layer} unit {u} vs the whole network"

    # the counts the sweep keeps, through ablation_counts, against counts of the brute-force logits
    counts = ablation_counts(model, data, layer, unit_ablations(units, sample), batch_size=4, device="cpu", split=split)
    naive = AblationCounts.empty(1 + len(sample), counts.num_classes)
    for row, logits in enumerate([base, *want]):
        naive._add_rows(logits.unsqueeze(0), labels, row)
    naive._add_images(labels)
    np.testing.assert_array_equal(counts.correct, naive.correct)
    np.testing.assert_array_equal(counts.predicted, naive.predicted)
    np.testing.assert_allclose(counts.margin_sum, naive.margin_sum, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("arch", "layer", "size", "direct", "every"),
    [
        ("shufflenet_v2_x1_0", "stage4", 64, False, 1),
        ("shufflenet_v2_x1_0", "conv5", 64, True, 1),
        ("resnet18", "layer3", 64, False, 1),
        ("resnet18", "layer4", 64, True, 1),
        ("vgg16", "features.28", 32, False, 8),
    ],
)
def test_rank_one_sweep_equals_brute_force(arch: str, layer: str, size: int, direct: bool, every: int) -> None:
    assert_rank_one_equals_brute_force(torchvision_model(arch, size), layer, direct=direct, every=every)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "contiguous"])
def test_either_memory_format_after_the_linear_operations_equals_brute_force(
    memory_format: torch.memory_format,
) -> None:
    """resnet18 ``layer3``: all of ``layer4`` but its first convolutions runs per (image, unit);
    the plan times it in both memory formats and keeps the faster, and both give the answer."""
    model = torchvision_model("resnet18", 64)
    plan = split_network(model, "layer3", device="cpu").plan
    assert plan is not None and plan.memory_format in (torch.channels_last, torch.contiguous_format)
    assert_rank_one_equals_brute_force(model, "layer3", direct=False, memory_format=memory_format)


def test_the_memory_format_is_timed_once_per_network_after_a_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second plan for the same network after the same layer (the set ablations after the
    sweep, the next job) takes the first one's choice without timing again."""
    from dissect_core import rankone

    monkeypatch.setattr(rankone, "_FORMAT_CHOICES", {})
    model = torchvision_model("resnet18", 64)
    first = split_network(model, "layer3", device="cpu").plan
    assert first is not None and len(rankone._FORMAT_CHOICES) == 1
    (key,) = rankone._FORMAT_CHOICES
    other = torch.channels_last if first.memory_format is torch.contiguous_format else torch.contiguous_format
    rankone._FORMAT_CHOICES[key] = other  # what a second timing would not give: the memo decides
    second = split_network(torchvision_model("resnet18", 64), "layer3", device="cpu").plan
    assert second is not None and second.memory_format is other
    assert split_network(torchvision_model("resnet18", 32), "layer3", device="cpu").plan is not None
    assert len(rankone._FORMAT_CHOICES) == 2  # other row shapes: timed again


def test_a_network_that_fails_on_the_timing_rows_keeps_its_rows_as_they_come(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice runs the model's own code on random rows; where that raises, no format is
    chosen (the rows run as they are made), rather than the plan failing."""
    from dissect_core import rankone

    class Picky(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == rankone.PLAN_ROWS:
                raise RuntimeError("not on 256 rows")
            return x

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, Picky) or super().is_leaf_module(m, name)

    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), Picky()).eval()
    rest = torch.fx.GraphModule(net, Leaves().trace(net))
    monkeypatch.setattr(rankone, "_FORMAT_CHOICES", {})
    module, chosen = rankone._fastest_rest(rest, [torch.Size([1, 4, 3, 3])], torch.zeros(1))
    assert module is rest and chosen is None and rankone._FORMAT_CHOICES == {}
    assert module(torch.ones(2, 4, 3, 3)).shape == (2, 4, 3, 3)


def test_no_memory_format_is_chosen_where_no_convolution_follows() -> None:
    for arch, layer in [("shufflenet_v2_x1_0", "stage4"), ("resnet18", "layer4")]:
        plan = split_network(torchvision_model(arch, 64), layer, device="cpu").plan
        assert plan is not None and plan.memory_format is None, (arch, layer)


def test_shufflenet_splits_by_its_graph_not_by_rerunning_the_network() -> None:
    split = split_network(torchvision_model("shufflenet_v2_x1_0", 64), "stage4", device="cpu")
    assert split.kind == "graph"
    consumers = [str(c.node.target) for c in split.plan.consumers] if split.plan else []
    assert consumers == ["conv5.0"]
    inner = split_network(torchvision_model("resnet18", 64), "layer3", device="cpu")
    assert inner.plan is not None
    names = sorted(str(c.node.target) for c in inner.plan.consumers)
    assert len(names) == 2 and names[0].endswith("0.conv1") and names[1].endswith("0.downsample.0")


class VectorHead(nn.Module):
    """conv -> pool -> ``hidden`` (a [B, 16] vector) -> BatchNorm -> ReLU -> Linear: the layer is a
    vector, and its zeroed units become BatchNorm's shift through the ReLU (not zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(torch.flatten(torch.relu(self.conv(x)).mean([2, 3]), 1))
        return self.out(torch.nn.functional.relu(self.norm(h)))


class NormFirst(nn.Module):
    """After ``body`` comes a GroupNorm, which mixes channels: no linear operation first."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 12, 3, padding=1)
        self.norm = nn.GroupNorm(3, 12)
        self.head = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.head(self.norm(self.body(x)))).mean([2, 3]))


class Shortcut(nn.Module):
    """The layer's output is added to a convolution of itself: read by a non-linear-first node."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 12, 3, padding=1)
        self.conv = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.body(x)
        return self.fc(torch.relu(a + self.conv(a)).mean([2, 3]))


def hand(module: nn.Module) -> LoadedModel:
    torch.manual_seed(3)
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)
    return LoadedModel(module.eval(), "test:hand", 4, (16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_a_vector_layer_with_an_mlp_after_it() -> None:
    model = hand(VectorHead())
    model.module.norm.running_mean.uniform_(-0.5, 0.5)
    model.module.norm.running_var.uniform_(0.5, 1.5)
    assert split_network(model, "hidden", device="cpu").layout.kind == "vector"
    assert_rank_one_equals_brute_force(model, "hidden", direct=True)


@pytest.mark.parametrize(("net", "layer"), [(NormFirst, "body"), (Shortcut, "body")])
def test_no_linear_operation_first_means_no_plan_and_the_same_results(net: type[nn.Module], layer: str) -> None:
    model = hand(net())
    split = split_network(model, layer, device="cpu")
    assert split.kind == "graph" and split.plan is None
    data = Noise(6, 16, 4)
    want = brute_force(model, data, layer, list(range(12)))
    base, labels = class_predictions(model, data, batch_size=8, device="cpu")
    counts = ablation_counts(model, data, layer, unit_ablations(12), batch_size=4, device="cpu")
    naive = AblationCounts.empty(13, 4)
    for row, logits in enumerate([base, *want]):
        naive._add_rows(logits.unsqueeze(0), labels, row)
    naive._add_images(labels)
    np.testing.assert_array_equal(counts.correct, naive.correct)
    np.testing.assert_allclose(counts.margin_sum, naive.margin_sum, rtol=1e-4, atol=1e-4)


def test_tables_mixing_single_and_set_rows_give_the_counts_without_a_plan() -> None:
    model = torchvision_model("resnet18", 32)
    data = Noise(10, 32, 5, seed=4)
    removed = torch.zeros(7, 512, dtype=torch.bool)
    removed[1, 3] = True
    removed[2, [5, 9, 100]] = True
    removed[3, 7] = True
    removed[4, 8] = True
    removed[5] = True
    removed[6, 511] = True
    fast = ablation_counts(model, data, "layer4", removed, batch_size=3, device="cpu", chunk_bytes=1)
    split = split_network(model, "layer4", device="cpu")
    split.plan = None
    slow = ablation_counts(model, data, "layer4", removed, batch_size=3, device="cpu", split=split)
    np.testing.assert_array_equal(fast.correct, slow.correct)
    np.testing.assert_array_equal(fast.predicted, slow.predicted)
    np.testing.assert_allclose(fast.margin_sum, slow.margin_sum, rtol=1e-4, atol=1e-4)


def test_no_plan_for_token_layers_untraceable_suffixes_or_probes_that_disagree() -> None:
    from dissect_core.layouts import LayerLayout

    conv = nn.Sequential(nn.Conv2d(4, 3, 1), nn.Flatten(), nn.Linear(3 * 2 * 2, 2)).eval()
    a = torch.randn(2, 4, 2, 2)
    assert rank_one_plan(conv, a, LayerLayout("map", 4, 2, 2)) is not None
    assert rank_one_plan(conv, a, LayerLayout("tokens", 4, 2, 2, ("class",))) is None
    assert rank_one_plan(lambda t: t.sum(1), a, LayerLayout("map", 4, 2, 2)) is None
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(16, 2)).eval()
    assert rank_one_plan(grouped, a, LayerLayout("map", 4, 2, 2)) is None
    training = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1), nn.Flatten(), nn.Linear(12, 2)).train()
    assert rank_one_plan(training, a, LayerLayout("map", 4, 2, 2)) is None

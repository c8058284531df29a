"""The engine against answers known by construction or computed independently in numpy."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dissect_core.concepts import Concept, ConceptDataset, Sample
from dissect_core.counts import ConceptCounts, TopActivations, prepare_labels
from dissect_core.dissect import (
    LayerResult,
    count_pass,
    dissect,
    finalize,
    quantile_pass,
    refine_pass,
    resolve_thresholds,
)
from dissect_core.errors import Cancelled, DatasetError, LayerError
from dissect_core.models import LoadedModel
from dissect_core.segmenter import SegmentedDataset, Segmenter
from dissect_core.unit_classifier import concept_presence, image_peaks, unit_classifier
from dissect_core.upsample import upsample_numpy
from dissect_core.visualize import (
    highlight,
    save_unit_strips,
    top_images_strip,
    unit_strip,
)

SQUARES = [
    Concept(1, "red-square", "object"),
    Concept(2, "green-square", "object"),
    Concept(3, "blue-square", "part"),
    Concept(4, "everything", "scene"),
]


class SquaresDataset(ConceptDataset):
    """16x16 images; colour channel k draws a 4x4-cell square (25% of the 8x8 mask) of concept k+1.

    Label maps: one per colour, plus a copy of the red map (a concept named twice at
    the same pixels must count once). Even images carry the whole-image label 4.
    """

    name = "squares"
    image_size = (16, 16)
    mask_size = (8, 8)
    concepts: ClassVar[list[Concept]] = SQUARES
    categories: ClassVar[list[str]] = ["object", "part", "scene"]

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.corners = rng.integers(0, 5, size=(n, 3, 2))

    def __len__(self) -> int:
        return len(self.corners)

    def masks(self, index: int) -> np.ndarray:
        m = np.zeros((3, 8, 8), dtype=bool)
        for k, (y, x) in enumerate(self.corners[index]):
            m[k, y : y + 4, x : x + 4] = True
        return m

    def __getitem__(self, index: int) -> Sample:
        m = self.masks(index)
        image = (np.repeat(np.repeat(m, 2, axis=1), 2, axis=2).transpose(1, 2, 0) * 255).astype(np.uint8)
        maps = np.stack([m[0] * 1, m[1] * 2, m[2] * 3, m[0] * 1]).astype(np.int32)
        labels = np.array([4] if index % 2 == 0 else [], dtype=np.int32)
        return Sample(image=image, label_maps=maps, image_labels=labels, class_label=index % 2)


class RectDataset(ConceptDataset):
    """Random rectangles at pixel resolution and random labels: nothing lines up by design."""

    name = "rects"
    image_size = (16, 16)
    mask_size = (8, 8)
    concepts: ClassVar[list[Concept]] = [Concept(i, f"c{i}", "object" if i < 4 else "texture") for i in range(1, 6)]
    categories: ClassVar[list[str]] = ["object", "texture"]

    def __init__(self, n: int = 20, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.images = np.zeros((n, 16, 16, 3), dtype=np.uint8)
        for i in range(n):
            for c in range(3):
                for _ in range(2):
                    y0, x0 = rng.integers(0, 14, size=2)
                    y1, x1 = y0 + rng.integers(1, 10), x0 + rng.integers(1, 10)
                    self.images[i, y0:y1, x0:x1, c] = 255
        self.maps = rng.integers(0, 5, size=(n, 2, 8, 8)).astype(np.int32)
        dup = rng.random((n, 8, 8)) < 0.3
        self.maps[:, 1][dup] = self.maps[:, 0][dup]
        self.image_labels = [np.array(rng.choice([0, 5, 3], size=rng.integers(0, 3)), np.int32) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        return Sample(self.images[index], self.maps[index], self.image_labels[index], -1)


class Units(nn.Module):
    """Channels 0-2 copy the colour masks at 8x8, channel 3 is constant, channel 4 a fixed pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        pattern = np.random.default_rng(7).integers(0, 16, (8, 8)) / 16.0
        self.register_buffer("pattern", torch.from_numpy(pattern).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        b = x.shape[0]
        return torch.cat([x, x.new_ones(b, 1, 8, 8), self.pattern.expand(b, 1, 8, 8)], dim=1)


class CopyNet(nn.Module):
    """Layers ``units`` (5 x 8 x 8) and ``coarse`` (5 x 4 x 4, upsampled by the engine)."""

    def __init__(self) -> None:
        super().__init__()
        self.units = Units()
        self.coarse = nn.AvgPool2d(2)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.coarse(self.units(x)).mean(dim=(2, 3)))


def copy_model() -> LoadedModel:
    return LoadedModel(CopyNet().eval(), "test:copynet", 2, (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "builtin")


def reference(model: LoadedModel, ds: ConceptDataset, layer: str, q: float) -> dict[str, np.ndarray]:
    """Dissection computed independently: numpy activations, numpy upsampling, numpy hazen, numpy counts."""
    images = np.stack([ds[i].image for i in range(len(ds))]).astype(np.float64) / 255.0
    images = images.transpose(0, 3, 1, 2)
    b = len(ds)
    pooled = images.reshape(b, 3, 8, 2, 8, 2).mean(axis=(3, 5))
    pattern = model.module.units.pattern.numpy().astype(np.float64)
    units = np.concatenate([pooled, np.ones((b, 1, 8, 8)), np.broadcast_to(pattern, (b, 1, 8, 8))], axis=1)
    acts = units if layer == "units" else units.reshape(b, 5, 4, 2, 4, 2).mean(axis=(3, 5))
    up = upsample_numpy(acts, ds.mask_size)
    flat = up.transpose(1, 0, 2, 3).reshape(5, -1)
    t = np.quantile(flat, q, axis=1, method="hazen")
    on = up > t[None, :, None, None]
    c1 = len(ds.concepts) + 1
    present = np.zeros((b, c1, *ds.mask_size), dtype=bool)
    for i in range(b):
        s = ds[i]
        for k in range(s.label_maps.shape[0]):
            for c in range(1, c1):
                present[i, c] |= s.label_maps[k] == c
        for c in s.image_labels:
            if c:
                present[i, c] = True
    inter = np.einsum("buyx,bcyx->uc", on.astype(np.int64), present.astype(np.int64))[:, 1:]
    act = on.sum(axis=(0, 2, 3))
    area = present.sum(axis=(0, 2, 3))[1:]
    union = act[:, None] + area[None, :] - inter
    iou = np.divide(inter.astype(np.float64), union, out=np.zeros(inter.shape), where=union > 0)
    peaks = acts.max(axis=(2, 3))
    return {"t": t, "inter": inter, "act": act, "area": area, "iou": iou, "peaks": peaks}


def test_copy_units_get_their_concept_with_iou_one() -> None:
    model, ds = copy_model(), SquaresDataset()
    result = dissect(model, ds, ["units"], quantile=0.75, batch_size=5, device="cpu")["units"]
    assert isinstance(result, LayerResult)
    assert result.thresholds.shape == (5,) and result.iou.shape == (5, 4)
    labels = result.labels
    assert [(lab.concept, lab.category) for lab in labels[:3]] == [
        ("red-square", "object"),
        ("green-square", "object"),
        ("blue-square", "part"),
    ]
    assert [lab.iou for lab in labels[:3]] == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(result.thresholds[:3], [0.5, 0.5, 0.5])
    assert labels[3].concept == "-" and result.iou[3].max() == 0.0
    assert result.iou[4].max() < 0.3
    assert result.n_images == 24 and result.n_pixels == 24 * 64
    assert result.concept_area[0] == 24 * 16 and result.concept_area[3] == 12 * 64
    rows = result.unit_rows()
    assert rows[0] == {"unit": 0, "label": "red-square", "category": "object", "iou": 1.0, "threshold": 0.5}
    pairs = list(result.iou_rows())
    assert len(pairs) == 5 * 4 and pairs[1] == {
        "unit": 0,
        "concept": "green-square",
        "category": "object",
        "iou": result.iou[0, 1],
    }
    summary = result.summary(min_iou=0.04)
    assert summary["detectors_by_category"]["object"] >= 2 and summary["detectors_by_category"]["part"] >= 1
    assert summary["unique_concepts"] >= 3


@pytest.mark.parametrize("q", [0.99, 0.8, 0.5])
@pytest.mark.parametrize("layer", ["coarse", "units"])
def test_engine_equals_numpy_reference_exactly(q: float, layer: str) -> None:
    model, ds = copy_model(), RectDataset()
    ref = reference(model, ds, layer, q)
    result = dissect(model, ds, [layer], quantile=q, batch_size=7, device="cpu", top_k_images=4)[layer]
    np.testing.assert_array_equal(result.thresholds, ref["t"])
    np.testing.assert_array_equal(result.intersection, ref["inter"])
    np.testing.assert_array_equal(result.act_area, ref["act"])
    np.testing.assert_array_equal(result.concept_area, ref["area"])
    np.testing.assert_array_equal(result.iou, ref["iou"])
    expected_top = np.stack([np.lexsort((np.arange(len(ds)), -ref["peaks"][:, u]))[:4] for u in range(5)])
    np.testing.assert_array_equal(result.top_images, expected_top)
    np.testing.assert_allclose(result.top_values, np.take_along_axis(ref["peaks"].T, expected_top, 1), rtol=1e-6)


def test_both_layers_from_one_forward_pass() -> None:
    model, ds = copy_model(), RectDataset()
    calls = []
    model.module.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    stages = []
    results = dissect(
        model,
        ds,
        ["coarse", "units"],
        quantile=0.9,
        batch_size=8,
        device="cpu",
        progress=lambda phase, done, total: stages.append((phase, done, total)),
    )
    assert sum(calls) == len(ds)
    assert set(results) == {"coarse", "units"}
    for layer in results:
        np.testing.assert_array_equal(results[layer].iou, reference(model, ds, layer, 0.9)["iou"])
    assert ("forward", 20, 20) in stages and ("count", 20, 20) in stages
    assert [s for s in stages if s[0] == "forward"][1] == ("forward", 8, 20)


def test_shards_merge_to_the_single_run() -> None:
    model, ds = copy_model(), RectDataset(n=23)
    layers = ["coarse", "units"]
    single = dissect(model, ds, layers, quantile=0.95, batch_size=4, device="cpu", top_k_images=3)
    shards = [list(range(9)), list(range(9, 15)), list(range(15, 23))]

    def merged(parts: list[dict]) -> dict:
        total = parts[0]
        for part in parts[1:]:
            for layer in total:
                total[layer].merge(part[layer])
        return total

    sketches = merged([quantile_pass(model, ds, layers, indices=s, batch_size=4, device="cpu") for s in shards])
    thresholds = resolve_thresholds(
        sketches,
        0.95,
        lambda brackets: merged(
            [refine_pass(model, ds, list(brackets), brackets, indices=s, batch_size=3, device="cpu") for s in shards]
        ),
    )
    counts = merged(
        [
            count_pass(model, ds, layers, thresholds, indices=s, batch_size=5, device="cpu", top_k_images=3)
            for s in shards
        ]
    )
    for layer in layers:
        res = finalize(layer, thresholds[layer], counts[layer], ds.concepts, quantile=0.95)
        np.testing.assert_array_equal(res.thresholds, single[layer].thresholds)
        np.testing.assert_array_equal(res.intersection, single[layer].intersection)
        np.testing.assert_array_equal(res.act_area, single[layer].act_area)
        np.testing.assert_array_equal(res.concept_area, single[layer].concept_area)
        np.testing.assert_array_equal(res.iou, single[layer].iou)
        np.testing.assert_array_equal(res.top_images, single[layer].top_images)
        assert [lab.concept for lab in res.labels] == [lab.concept for lab in single[layer].labels]
        # the label evidence too, bit for bit (block tallies are integers; the resamples are seeded)
        assert res.evidence is not None and single[layer].evidence is not None
        for name, value in res.evidence.arrays().items():
            np.testing.assert_array_equal(value, single[layer].evidence.arrays()[name], err_msg=name)
        assert res.evidence.blocks >= 2


@pytest.mark.parametrize("memory", [0, 1 << 30, "one batch"])
def test_cached_passes_equal_fresh_forward_passes(
    tmp_path: Path, memory: int | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached activations and labels, on disk, in memory, or the first batch's
    activations in memory and the rest on disk, give what fresh forward passes give (a
    refinement pass and the count pass read them back)."""
    engine = importlib.import_module("dissect_core.dissect")
    monkeypatch.setattr(engine, "_CACHE_MEMORY", memory if isinstance(memory, int) else 0)
    places: list[tuple[bool, bool]] = []  # per batch: (activations held, labels held)
    write = engine._Cache.write

    def spy(cache: Any, prepared: Any) -> None:
        if memory == "one batch" and not cache.batches:
            cache.memory_left = sum(a.numel() * a.element_size() for a in prepared.acts.values())
        write(cache, prepared)
        places.append((cache.offsets["coarse"][-1] < 0, cache.labels[-1][0] < 0))

    monkeypatch.setattr(engine._Cache, "write", spy)
    model, ds = copy_model(), RectDataset()
    cached = dissect(
        model, ds, ["coarse"], quantile=0.9, batch_size=6, device="cpu", cache_dir=tmp_path, max_collect=50
    )["coarse"]
    assert list(tmp_path.iterdir()) == []
    assert len(places) > 1
    if memory == 0:
        assert not any(held for place in places for held in place)
    elif memory == "one batch":
        assert places == [(True, False)] + [(False, False)] * (len(places) - 1)
    else:
        assert all(held for place in places for held in place)
    fresh = count_pass(model, ds, ["coarse"], {"coarse": cached.thresholds}, batch_size=4, device="cpu")["coarse"]
    np.testing.assert_array_equal(cached.intersection, fresh.intersection.numpy()[:, 1:])
    np.testing.assert_array_equal(cached.act_area, fresh.act_area.numpy())
    np.testing.assert_array_equal(cached.thresholds, reference(model, ds, "coarse", 0.9)["t"])


def test_counts_dedupe_and_whole_image_labels() -> None:
    on = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    on[0, 0, 0, 0] = on[0, 0, 1, 1] = on[1, 1, 0, 1] = True
    maps = torch.tensor([[[[1, 2], [0, 1]], [[1, 0], [3, 3]]], [[[2, 2], [2, 2]], [[0, 0], [0, 0]]]], dtype=torch.int32)
    image = torch.tensor([[3, 3], [0, 0]], dtype=torch.int32)
    counts = ConceptCounts(2, 3)
    counts.add(on, maps, image)
    np.testing.assert_array_equal(counts.concept_area.numpy(), [0, 2, 5, 4])
    np.testing.assert_array_equal(counts.act_area.numpy(), [2, 1])
    np.testing.assert_array_equal(counts.intersection.numpy(), [[0, 2, 0, 2], [0, 0, 1, 0]])
    merged = ConceptCounts.from_state_dict(counts.state_dict()).merge(counts)
    np.testing.assert_array_equal(merged.intersection.numpy(), 2 * counts.intersection.numpy())
    iou = counts.iou()
    assert iou[0, 1] == 1.0 and iou[0, 3] == 0.5 and iou[1, 2] == 0.2
    with pytest.raises(DatasetError):
        counts.add(on, maps + 5, image)


def test_top_activations_merge_deterministically() -> None:
    top = TopActivations(1, 2)
    top.add(torch.tensor([[1.0], [3.0]]), torch.tensor([5, 6]))
    other = TopActivations(1, 2)
    other.add(torch.tensor([[3.0], [2.0]]), torch.tensor([1, 2]))
    top.merge(other)
    assert top.indices.tolist() == [[1, 6]] and top.values.tolist() == [[3.0, 3.0]]


def test_cancel_unknown_layer_and_bad_indices() -> None:
    model, ds = copy_model(), SquaresDataset(n=8)
    with pytest.raises(Cancelled):
        dissect(model, ds, ["units"], batch_size=2, device="cpu", should_stop=lambda: True)
    with pytest.raises(LayerError) as err:
        dissect(model, ds, ["nope"], device="cpu")
    assert "units" in err.value.details["valid"]
    # A fully connected layer is a layer of 1 x 1 maps (dissect_core.layouts), no longer refused.
    assert dissect(model, ds, ["head"], device="cpu")["head"].iou.shape == (2, 4)
    with pytest.raises(DatasetError):
        dissect(model, ds, ["units"], indices=[0, 99], device="cpu")


class ChannelSegmenter(nn.Module):
    """Scores [B, 4, 4, 4]: background 0.5, class k = the pooled colour channel k-1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(x, 4)
        return torch.cat([torch.full_like(pooled[:, :1], 0.5), pooled], dim=1)


def test_segmenter_supplies_the_concepts() -> None:
    model, ds = copy_model(), SquaresDataset()
    seg = Segmenter(ChannelSegmenter(), ["none", "red", "green", "blue"], mean=(0, 0, 0), std=(1, 1, 1))
    result = dissect(model, ds, ["units"], quantile=0.75, device="cpu", segmenter=seg)["units"]
    assert [c.name for c in result.concepts] == ["red", "green", "blue"]
    assert result.n_pixels == len(ds) * 16
    assert [lab.concept for lab in result.labels[:3]] == ["red", "green", "blue"]
    assert min(lab.iou for lab in result.labels[:3]) > 0.5
    wrapped = SegmentedDataset(ds, seg)
    assert wrapped.mask_size == (4, 4) and wrapped[0].label_maps.shape == (1, 4, 4)
    again = dissect(model, wrapped, ["units"], quantile=0.75, device="cpu")["units"]
    np.testing.assert_array_equal(again.iou, result.iou)


def test_unit_as_classifier_and_pictures(tmp_path: Path) -> None:
    model, ds = copy_model(), SquaresDataset()
    peaks = image_peaks(model, ds, ["coarse"], device="cpu")["coarse"]
    assert peaks.shape == (24, 5)
    presence = concept_presence(ds)
    assert presence.shape == (24, 5) and presence[:, 4].tolist() == [i % 2 == 0 for i in range(24)]
    perfect = unit_classifier(np.array([0.1, 0.9, 0.8, 0.2]), np.array([False, True, True, False]))
    assert perfect.balanced_accuracy == 1.0 and 0.2 <= perfect.threshold < 0.8
    assert len(perfect.positive_peaks) == 2 and len(perfect.negative_peaks) == 2
    mixed = unit_classifier(np.array([1.0, 2.0, 3.0, 4.0]), np.array([True, False, True, True]))
    assert mixed.balanced_accuracy == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError):
        unit_classifier(np.ones(3), np.ones(3, dtype=bool))

    image = np.full((8, 8, 3), 200, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    out = highlight(image, mask)
    assert out[0, 0].tolist() == [60, 60, 60] and out[4, 4].tolist() == [200, 200, 200]
    assert out[2, 2].tolist() == [255, 220, 0]
    strip = unit_strip([image, image], [torch.ones(4, 4), torch.zeros(4, 4)], 0.5, gap=2)
    assert strip.size == (18, 8)
    result = dissect(model, ds, ["units"], quantile=0.75, device="cpu", top_k_images=3)["units"]
    picture = top_images_strip(model, ds, result, 0, scale=2)
    assert picture.size == ((3 * 16 + 2 * 4) * 2, 32)
    paths = save_unit_strips(model, ds, result, tmp_path, units=[0, 2, 4], units_per_pass=2)
    assert [p.name for p in paths] == ["unit_0000.png", "unit_0002.png", "unit_0004.png"]
    saved = Image.open(paths[0])
    assert saved.size == (3 * 16 + 2 * 4, 16)
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(top_images_strip(model, ds, result, 0)))


@pytest.mark.parametrize("case", ["disjoint", "overlapping", "no-maps", "no-image-labels"])
def test_prepared_labels_match_sets_per_pixel(case: str) -> None:
    """Each pixel's concepts (its map labels and its image's labels) counted once, against
    Python sets; disjoint maps (one per category, the usual case) skip the comparisons."""
    gen = torch.Generator().manual_seed(4)
    b, k, j, h, w, c = 5, 3, 2, 4, 6, 12
    if case == "disjoint":  # map m holds concepts 1 + 4m .. 4 + 4m, image labels 9..12 only
        maps = torch.randint(0, 5, (b, k, h, w), generator=gen)
        maps = torch.where(maps > 0, maps + 4 * torch.arange(k)[None, :, None, None], 0)
        image = torch.randint(9, 13, (b, j), generator=gen)
        image[:, 1] = image[:, 0]  # a duplicate image label
    else:
        maps = torch.randint(0, 5, (b, k, h, w), generator=gen)
        image = torch.randint(0, 5, (b, j), generator=gen)
    if case == "no-maps":
        maps = maps[:, :0]
    if case == "no-image-labels":
        image = image[:, :0]
    before = maps.clone()
    labels = prepare_labels(maps, image, c, size=(h, w))
    assert torch.equal(maps, before)
    area = np.zeros(c + 1, np.int64)
    for i in range(b):
        for p in range(h * w):
            want = {int(v) for v in maps[i, :, p // w, p % w]} | {int(v) for v in image[i]}
            want.discard(0)
            got = [int(v) for v in labels.rows(torch.tensor([i]), torch.tensor([p]))[0] if v]
            assert sorted(got) == sorted(want) and len(got) == len(set(got)), (i, p, got, want)
            for v in want:
                area[v] += 1
    np.testing.assert_array_equal(labels.concept_area.numpy(), area)

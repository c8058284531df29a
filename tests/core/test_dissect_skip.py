"""Exact shortcuts of the engine: skipped upsampling, and the top maps kept for pictures."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dissect_core import fused
from dissect_core.concepts import Concept, ConceptDataset, Sample
from dissect_core.counts import ConceptCounts, TopActivations
from dissect_core.dissect import (
    count_pass,
    dissect,
    finalize,
    quantile_pass,
    refine_pass,
    resolve_thresholds,
)
from dissect_core.models import LoadedModel
from dissect_core.quantile import QuantileRefiner
from dissect_core.upsample import upsample_numpy
from dissect_core.visualize import save_unit_strips, top_images_strip

engine = importlib.import_module("dissect_core.dissect")  # the module (the package exports the function)


class Blocks(ConceptDataset):
    """16x16 images of random rectangles; label maps of random concepts at 8x8.

    Blue is drawn on about half of the images only (unit ``flag`` below).
    """

    name = "blocks"
    image_size = (16, 16)
    mask_size = (8, 8)
    concepts: ClassVar[list[Concept]] = [Concept(i, f"c{i}", "object") for i in range(1, 5)]
    categories: ClassVar[list[str]] = ["object"]

    def __init__(self, n: int = 30, seed: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.images = np.zeros((n, 16, 16, 3), dtype=np.uint8)
        for i in range(n):
            for c in range(3):
                if c == 2 and rng.random() < 0.5:
                    continue
                for _ in range(rng.integers(1, 3)):
                    y0, x0 = rng.integers(0, 14, size=2)
                    y1, x1 = y0 + rng.integers(1, 8), x0 + rng.integers(1, 8)
                    self.images[i, y0:y1, x0:x1, c] = 255
        self.maps = rng.integers(0, 5, size=(n, 1, 8, 8)).astype(np.int32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        return Sample(self.images[index], self.maps[index], np.zeros(0, np.int32), -1)


def _units(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, 16, 16] in [0, 1] -> [B, 4, 8, 8]: red (>= 0), a negative unit, a 0/1 flag map, red - green."""
    p = nn.functional.avg_pool2d(x, 2)
    flag = (p[:, 2:3].amax(dim=(2, 3), keepdim=True) > 0).to(x.dtype).expand_as(p[:, :1])
    return torch.cat([p[:, :1], -p[:, 1:2] - 0.5, flag, p[:, :1] - p[:, 1:2]], dim=1)


class Units(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _units(x)


class Net(nn.Module):
    """``units`` (4 x 8 x 8, the mask size: no upsampling) and ``coarse`` (4 x 4 x 4, upsampled 2x)."""

    def __init__(self) -> None:
        super().__init__()
        self.units = Units()
        self.coarse = nn.AvgPool2d(2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.coarse(self.units(x)).mean(dim=(2, 3)))


def net() -> LoadedModel:
    return LoadedModel(Net().eval(), "test:blocks", 2, (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "builtin")


def native(ds: Blocks, layer: str) -> np.ndarray:
    x = torch.from_numpy(ds.images.transpose(0, 3, 1, 2).astype(np.float64) / 255.0)
    a = _units(x)
    return (a if layer == "units" else nn.functional.avg_pool2d(a, 2)).numpy()


def reference(ds: Blocks, layer: str, q: float) -> dict[str, np.ndarray]:
    """Thresholds and counts in float64 numpy (exact here: every value is a multiple of 1/64)."""
    up = upsample_numpy(native(ds, layer), ds.mask_size)
    t = np.quantile(up.transpose(1, 0, 2, 3).reshape(up.shape[1], -1), q, axis=1, method="hazen")
    on = up > t[None, :, None, None]
    present = np.stack([ds.maps[:, 0] == c for c in range(1, 5)], axis=1)
    inter = np.einsum("buyx,bcyx->uc", on.astype(np.int64), present.astype(np.int64))
    return {"t": t, "inter": inter, "act": on.sum(axis=(0, 2, 3))}


def _count_maps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real = engine._upsample_maps

    def spy(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        seen.append(maps.shape[0])
        return real(maps, size)

    monkeypatch.setattr(engine, "_upsample_maps", spy)
    return seen


@pytest.mark.parametrize(
    "native_size,size",
    [
        ((8, 8), (32, 32)),
        ((3, 3), (7, 11)),
        ((4, 4), (8, 8)),
        ((7, 7), (56, 56)),
        ((13, 13), (56, 56)),
        ((6, 9), (50, 37)),
        ((5, 5), (5, 5)),
    ],
)
def test_upsampling_a_subset_gives_the_same_values(native_size: tuple[int, int], size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(9, 40, *native_size, generator=gen).relu_() * 7
    full = torch.cat([up for _, up in engine._chunks(a, size)])
    for n in (1, 2, 3, 17, 63, 64, 65, 200):
        pick = torch.randperm(9 * 40, generator=gen)[:n]
        b, u = pick // 40, pick % 40
        assert torch.equal(engine._upsample_maps(a[b, u], size), full[b, u])


@pytest.mark.parametrize(
    "native_size,size", [((4, 4), (8, 8)), ((3, 5), (10, 7)), ((6, 4), (13, 11)), ((4, 4), (4, 4))]
)
def test_map_bound_is_an_upper_bound(native_size: tuple[int, int], size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(50, 6, *native_size, generator=gen) * 3
    a[:, 0] = a[:, 0].relu()
    a[:, 1] = -a[:, 1].abs()
    a[:, 2] = 1.0 / 3.0
    a[:, 3] *= 1e-30
    bounds = engine._MapBound(native_size, size, torch.device("cpu"))
    lower, upper = bounds.both(a)
    up = torch.cat([up for _, up in engine._chunks(a, size)])
    assert (up.amax(dim=2).to(torch.float64) <= upper).all()
    assert (up.amin(dim=2).to(torch.float64) >= lower).all()
    assert (upper >= 0).all()
    rows = bounds.rows(a.reshape(-1, *native_size))
    assert rows.shape == (50 * 6, size[0])
    assert (up.view(-1, size[0], size[1]).amax(dim=2).to(torch.float64) <= rows).all()
    assert (rows.view(50, 6, -1).amax(dim=2) <= upper * (1 + 1e-12)).all()


@pytest.mark.parametrize(
    "native_size,size", [((4, 4), (8, 8)), ((3, 5), (10, 7)), ((6, 4), (13, 11)), ((4, 4), (4, 4)), ((7, 7), (56, 56))]
)
def test_cell_lower_bounds_lie_below_the_upsampled_values(native_size: tuple[int, int], size: tuple[int, int]) -> None:
    """The first floor's cell bounds, each repeated over its cell's pixels and sorted, lie at
    or below the sorted upsampled values of the same map (so the k-th largest bound is at most
    the k-th largest value, for every k); the border cells read the zero padding; a constant
    map's inner cells are bounded tightly."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(20, 6, *native_size, generator=gen) * 3
    a[:, 0] = a[:, 0].relu()
    a[:, 1] = -a[:, 1].abs()
    a[:, 2] = 1.0 / 3.0
    a[:, 3] *= 1e-30
    a[:, 4] = 5.0 + a[:, 4].abs() * 1e-3  # nearly constant and positive: only padding lowers its border
    bounds = engine._MapBound(native_size, size, torch.device("cpu"))
    low, count = bounds.cell_lower(a)
    assert int(count.sum()) == size[0] * size[1] and low.dtype == torch.float32
    up = torch.cat([up for _, up in engine._chunks(a, size)])
    for b in range(a.shape[0]):
        for u in range(a.shape[1]):
            bound = low[b, u].repeat_interleave(count).sort(descending=True).values
            values = up[b, u].sort(descending=True).values
            assert (bound <= values).all(), (b, u)
    pixels = size[0] * size[1]
    inner = float(torch.sort(low[0, 2].repeat_interleave(count), descending=True).values[pixels // 4])
    assert inner == pytest.approx(1.0 / 3.0, rel=1e-5) or (native_size == (4, 4) and size == (8, 8))
    if native_size != size:
        assert float(low[:, 4].amin()) <= 0.0  # the border cells blend toward 0


def _two_sketches(a: torch.Tensor, q: float, flag: str) -> dict[bool, engine._RisingFloorSketch]:
    """Two rising-floor sketches of native maps ``a`` [B, U, 7, 7] upsampled to 28 px, with
    ``flag`` (``skip`` or ``guess``) on and off, fed 16 images a batch."""
    cpu = torch.device("cpu")
    sketches = {
        on: engine._RisingFloorSketch(a.shape[1], (7, 7), (28, 28), q, a.shape[0], cpu, **{flag: on})
        for on in (True, False)
    }
    for part in a.split(16):
        for sketch in sketches.values():
            sketch.add(part, part.amax(dim=(2, 3)))
    return sketches


@pytest.mark.parametrize("q", [0.99, 0.95, 0.9, 0.5])
def test_the_first_floor_keeps_the_bracket_of_a_plain_sketch(q: float) -> None:
    """Maps that are constant per image (their upsampled inner pixels equal the constant, so
    the first batch's cell bounds are tight) and noisy ones: the sketch whose floor starts from
    the first batch's cell bounds brackets the quantile as one that sketches every value."""
    gen = torch.Generator().manual_seed(8)
    images, units = 48, 5
    a = torch.randn(images, units, 7, 7, generator=gen)
    a[:, 0] = torch.linspace(1.0, 2.0, images)[:, None, None]
    a[:, 1] = -torch.linspace(1.0, 2.0, images)[:, None, None]
    a[:, 2] = torch.rand(images, generator=gen)[:, None, None] * 3
    sketches = _two_sketches(a, q, "skip")
    assert bool((sketches[True].sketch.floor[[0, 2]] > 0).all()) or q == 0.5
    # The brackets hold the same ranks in the same buckets (the rising sketch knows the
    # largest value by its bound only, so its last bucket may reach higher), and refine to
    # the exact quantiles of the upsampled values.
    up = torch.cat([up for _, up in engine._chunks(a, (28, 28))]).transpose(0, 1).reshape(units, -1)
    expected = np.quantile(up.numpy().astype(np.float64), q, axis=1, method="hazen")
    plain, rising = sketches[False].sketch.bracket(q), sketches[True].sketch.bracket(q)
    for name in ("key_lo", "below", "inside"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(rising, name), err_msg=name)
    for bracket in (plain, rising):
        while not bracket.done:
            refiner = QuantileRefiner(bracket)
            refiner.add(up)
            bracket = refiner.bracket()
        np.testing.assert_array_equal(bracket.values(), expected)


class HotStart(Blocks):
    """Blocks whose first two images are red all over, and the others at most half red: the
    first batch (of 2) shows the red unit far above its quantile over all images."""

    def __init__(self) -> None:
        super().__init__(n=60, seed=5)
        self.images[2:, :, :, 0] //= 2
        self.images[:2, :, :, 0] = 255


@pytest.mark.parametrize("layer", ["coarse", "units"])
def test_a_guessed_floor_that_overshoots_is_sketched_again(layer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first floor's guess (the first batch's native 0.75 quantile for q = 0.95) lies above
    the red unit's threshold here, so that unit's values below it were only counted: the units
    it overshot are found and sketched again, and the thresholds and counts are those of a
    run that upsamples and sketches every value."""
    missed: list[list[int]] = []
    real = engine._RisingFloorSketch.missed

    def spy(self: engine._RisingFloorSketch) -> torch.Tensor:
        units = real(self)
        missed.append(units.tolist())
        return units

    monkeypatch.setattr(engine._RisingFloorSketch, "missed", spy)
    # The brackets refined or counted: how many values each run's red unit still has to sort out.
    inside: list[int] = []
    real_refiner = engine.QuantileRefiner.__init__

    def refiner_spy(self: QuantileRefiner, bracket: engine.QuantileBracket, **kw: int) -> None:
        inside.append(int(bracket.inside[:, 0].max()))
        real_refiner(self, bracket, **kw)

    monkeypatch.setattr(engine.QuantileRefiner, "__init__", refiner_spy)
    model, ds, q = net(), HotStart(), 0.95
    monkeypatch.setattr(engine, "_SKIP_MAPS", False)
    full = dissect(model, ds, [layer], quantile=q, batch_size=2, device="cpu")[layer]
    plain_inside, inside[:] = max(inside, default=0), []
    monkeypatch.setattr(engine, "_SKIP_MAPS", True)
    res = dissect(model, ds, [layer], quantile=q, batch_size=2, device="cpu")[layer]
    assert 0 in missed[-1]  # the red unit
    # Sketched again, it is bracketed as finely as by the plain sketch (without that, its
    # bracket would hold every value below the guess, for the refinement passes to narrow).
    assert max(inside, default=0) <= plain_inside
    up = upsample_numpy(native(ds, layer)[:, 0], ds.mask_size)
    assert float(np.quantile(native(ds, layer)[:2, 0], 0.75)) > float(np.quantile(up, q, method="hazen"))
    for name in ("thresholds", "intersection", "act_area", "iou"):
        np.testing.assert_array_equal(getattr(res, name), getattr(full, name), err_msg=name)


def _assert_sketched_again_and_exact(
    a: torch.Tensor, bracket: engine.QuantileBracket, missed: torch.Tensor, q: float, size: tuple[int, int]
) -> None:
    """The units ``missed`` of native maps ``a`` sketched again (as the engine does, 16 images
    a batch) and spliced into ``bracket``, which then refines to numpy's exact quantiles."""
    images, units, native_size = a.shape[0], a.shape[1], tuple(a.shape[2:])
    if missed.numel():
        again = engine._RisingFloorSketch(missed.numel(), native_size, size, q, images, torch.device("cpu"))
        for part in a.index_select(1, missed).split(16):
            again.add(part, part.amax(dim=(2, 3)))
        bracket = bracket.with_units(missed.numpy(), again.sketch.bracket(q))
    up = torch.cat([up for _, up in engine._chunks(a, size)]).transpose(0, 1).reshape(units, -1)
    expected = np.quantile(up.numpy().astype(np.float64), q, axis=1, method="hazen")
    while not bracket.done:
        refiner = QuantileRefiner(bracket)
        refiner.add(up)
        bracket = refiner.bracket()
    np.testing.assert_array_equal(bracket.values(), expected)


def test_the_guessed_floor_keeps_the_bracket_of_a_plain_sketch() -> None:
    """Where the guess does not overshoot (smooth maps, one unit far hotter later than in the
    first batch), the sketch that starts from it brackets the quantile as one that sketches
    every value, and misses no unit; one whose first batch is hot is missed."""
    gen = torch.Generator().manual_seed(9)
    images, units, q = 64, 4, 0.99
    # Smooth maps (white noise blends down so much that the guess would overshoot it).
    coarse = torch.randn(images, units, 3, 3, generator=gen)
    a = nn.functional.interpolate(coarse, size=(7, 7), mode="bilinear") + 0.05 * torch.randn(
        images, units, 7, 7, generator=gen
    )
    a[16:, 1] *= 4  # hotter after the first batch: the guess lies far below its threshold
    a[:16, 2] += 10  # hot in the first batch only: the guess overshoots
    sketches = _two_sketches(a, q, "guess")
    assert sketches[True].missed().tolist() == [2] and sketches[False].missed().numel() == 0
    guessed, plain = sketches[True].sketch.bracket(q), sketches[False].sketch.bracket(q)
    for name in ("key_lo", "below", "inside"):
        np.testing.assert_array_equal(getattr(plain, name)[:, [0, 1, 3]], getattr(guessed, name)[:, [0, 1, 3]])
    with pytest.raises(ValueError, match="same values"):
        guessed.with_units(np.array([2]), plain)
    _assert_sketched_again_and_exact(a, guessed, torch.tensor([2]), q, (28, 28))


@pytest.mark.parametrize(
    "native_size,q,guessed",
    [((7, 7), 0.99, True), ((7, 7), 0.9, True), ((7, 7), 0.5, False), ((7, 7), 1.0, False), ((1, 1), 0.99, False)],
)
def test_a_guessing_sketch_refines_to_the_exact_quantiles(
    native_size: tuple[int, int], q: float, guessed: bool
) -> None:
    """Whether the first floor is guessed (a level of at least 0.5, and at least 8 native
    values per unit above it in the first batch: not for 1 x 1 maps, nor q = 1), and, with the
    units it missed sketched again, the exact quantiles in the end."""
    gen = torch.Generator().manual_seed(10)
    images, units, size = 64, 5, (28, 28)
    coarse = torch.randn(images, units, 3, 3, generator=gen)
    a = nn.functional.interpolate(coarse, size=native_size, mode="bilinear")
    a[:16, 4] += 5  # a unit hot in the first batch only
    cpu = torch.device("cpu")
    sketch = engine._RisingFloorSketch(units, native_size, size, q, images, cpu, guess=True)
    for part in a.split(16):
        sketch.add(part, part.amax(dim=(2, 3)))
    assert sketch.guessed_first is guessed
    _assert_sketched_again_and_exact(a, sketch.sketch.bracket(q), sketch.missed(), q, size)


@pytest.mark.parametrize(
    "native_size,size",
    [
        ((4, 4), (64, 64)),
        ((8, 8), (32, 32)),
        ((7, 7), (112, 112)),
        ((3, 5), (10, 7)),
        ((4, 4), (4, 4)),
        ((6, 4), (12, 48)),
    ],
)
def test_segment_bounds_bound_every_pixel_of_their_segment(native_size: tuple[int, int], size: tuple[int, int]) -> None:
    """Row segments (spans of columns that read a few native columns) have bounds at least
    each of their upsampled values and at most the row's bound; segments flagged as zeros
    are all exact zeros."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(60, 6, *native_size, generator=gen) * 3
    a[:, 0] = a[:, 0].relu()
    a[:, 1] = -a[:, 1].abs()
    a[:, 2] = 1.0 / 3.0
    a[:, 3] *= 1e-30
    a[:, 4] = a[:, 4].relu() * (torch.rand(60, *native_size, generator=gen) < 0.2)  # sparse: zero segments
    bounds = engine._MapBound(native_size, size, torch.device("cpu"))
    maps = a.reshape(-1, *native_size)
    seg, zero = bounds.segments(maps)
    width = bounds.seg_width
    g = size[1] // width
    assert seg.shape == zero.shape == (maps.shape[0], size[0], g) and g * width == size[1]
    if size[1] % native_size[1] == 0 and size[1] >= 4 * 16:
        assert g >= 4 and width >= 16
    up = torch.cat([up for _, up in engine._chunks(a, size)]).view(-1, size[0], g, width)
    assert (up.amax(dim=3).to(torch.float64) <= seg).all()
    assert not (zero & ~(up == 0).all(dim=3)).any()
    assert (seg.amax(dim=2) <= bounds.rows(maps) * (1 + 1e-12)).all()
    if g > 1:
        assert zero.reshape(60, 6, -1)[:, 4].any() and (seg.amax(dim=2) < bounds.rows(maps)).any()


@pytest.mark.parametrize(
    "native_size,size", [((4, 4), (8, 8)), ((3, 5), (10, 7)), ((8, 8), (32, 32)), ((4, 4), (4, 4))]
)
def test_zero_rows_are_exactly_the_all_zero_upsampled_rows(native_size: tuple[int, int], size: tuple[int, int]) -> None:
    """Rows the sketch only counts as zeros: every one flagged is all exact zeros, and on
    maps with whole zero native rows (post-ReLU units) the flag finds such rows."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(40, 5, *native_size, generator=gen)
    a[:, :3] = a[:, :3].relu()
    keep = torch.rand(40, 5, native_size[0], 1, generator=gen) < 0.4
    a = a * keep  # whole native rows of zeros
    a[:, 3] = -a[:, 3].abs() * keep[:, 3]  # negatives and zero rows
    a[:, 4, :, 0] = 1e-38  # tiny but not zero: never flagged
    bounds = engine._MapBound(native_size, size, torch.device("cpu"))
    maps = a.reshape(-1, *native_size)
    rows, zero = bounds.rows_and_zeros(maps)
    assert torch.equal(rows, bounds.rows(maps))
    up = torch.cat([up for _, up in engine._chunks(a, size)]).view(-1, size[0], size[1])
    all_zero = (up == 0).all(dim=2)
    assert not (zero & ~all_zero).any()
    assert zero.any() and not zero.view(40, 5, -1)[:, 4].any()
    # Rows that read only zero native rows are flagged (a zero row the blend of nonzero rows
    # could in principle reach by cancellation is not, and need not be).
    reads = (engine.interpolation_matrix(native_size[0], size[0]) != 0).to(torch.float64)
    expect = ((maps.abs().amax(dim=2) != 0).to(torch.float64) @ reads.t()) == 0
    assert torch.equal(zero, expect)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("sparse_below", [1 / 8, 1.0, -1.0])
@pytest.mark.parametrize("layer", ["coarse", "units"])
@pytest.mark.parametrize("q", [0.99, 0.8, 0.6])
def test_skipping_counts_as_upsampling_everything(
    layer: str, q: float, sparse_below: float, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipping maps and rows, and (``chunked``) batches split into many chunks with the
    floor raised between them and rows cut into short segments, give the thresholds and
    counts of upsampling everything."""
    monkeypatch.setattr(importlib.import_module("dissect_core.quantile"), "_SPARSE_BELOW", sparse_below)
    if chunked:  # one image per chunk of the whole batch, a few maps per chunk of a subset,
        # rows in segments of 2 columns
        monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", 4 * 64)
        monkeypatch.setattr(engine, "_MIN_MAPS", 3)
        monkeypatch.setattr(engine, "_SEGMENT_MIN", 2)
        monkeypatch.setattr(engine, "_SEGMENTS_MIN", 2)
        monkeypatch.setattr(engine._MapUpsampler, "_verdicts", {})
        monkeypatch.setattr(engine._MapUpsampler, "_row_verdicts", {})
    model, ds = net(), Blocks()
    ref = reference(ds, layer, q)
    assert ref["t"][1] < 0
    monkeypatch.setattr(engine, "_SKIP_MAPS", False)
    full = dissect(model, ds, [layer], quantile=q, batch_size=7, device="cpu")[layer]
    monkeypatch.setattr(engine, "_SKIP_MAPS", True)
    skipped = dissect(model, ds, [layer], quantile=q, batch_size=7, device="cpu")[layer]
    for res in (full, skipped):
        np.testing.assert_array_equal(res.thresholds, ref["t"])
        np.testing.assert_array_equal(res.intersection, ref["inter"])
        np.testing.assert_array_equal(res.act_area, ref["act"])
    np.testing.assert_array_equal(skipped.iou, full.iou)
    np.testing.assert_array_equal(skipped.concept_area, full.concept_area)


@pytest.mark.parametrize("overlap", [True, False])
def test_sketch_on_its_own_thread_or_inline(overlap: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass 1 feeds the sketch inline on the CPU, on a second thread elsewhere: same result."""
    monkeypatch.setattr(engine, "_OVERLAP_SKETCH_ON_CPU", overlap)
    model, ds = net(), Blocks()
    for layer in ("units", "coarse"):
        ref = reference(ds, layer, 0.9)
        result = dissect(model, ds, [layer], quantile=0.9, batch_size=5, device="cpu")[layer]
        np.testing.assert_array_equal(result.thresholds, ref["t"])
        np.testing.assert_array_equal(result.intersection, ref["inter"])


def test_maps_whose_max_is_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit 2 is 1.0 on the flagged images and 0 elsewhere; its threshold is exactly 1.0 here
    (and units 0 and 3 have t = 0 on ``units``, where all-zero maps are skipped)."""
    model, ds = net(), Blocks()
    peaks = native(ds, "units").max(axis=(2, 3))
    assert (peaks[:, 2] == 1.0).sum() >= 10
    maps = _count_maps(monkeypatch)
    for layer, q in (("units", 0.6), ("coarse", 0.8)):
        ref = reference(ds, layer, q)
        assert ref["t"][2] == 1.0 and ref["t"][1] < 0
        thresholds = {layer: ref["t"]}
        upsampled = []
        for skip in (False, True):
            monkeypatch.setattr(engine, "_SKIP_MAPS", skip)
            maps.clear()
            counts = count_pass(model, ds, [layer], thresholds, batch_size=4, device="cpu")[layer]
            upsampled.append(sum(maps))
            result = dissect(model, ds, [layer], quantile=q, batch_size=4, device="cpu")[layer]
            np.testing.assert_array_equal(result.thresholds, ref["t"])
            for inter, act in (
                (counts.intersection.numpy()[:, 1:], counts.act_area.numpy()),
                (result.intersection, result.act_area),
            ):
                np.testing.assert_array_equal(inter, ref["inter"])
                np.testing.assert_array_equal(act, ref["act"])
        assert ref["act"][2] == 0
        assert upsampled[1] < upsampled[0]


def test_a_counter_falls_back_when_the_subset_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a subset upsampled differently from the whole batch, the first batch's check notices."""
    model, ds = net(), Blocks()
    ref = reference(ds, "coarse", 0.8)
    real = engine._upsample_maps
    calls: list[int] = []

    def wrong_unless_whole_batch(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        calls.append(maps.shape[0])
        up = real(maps, size)
        return up if maps.shape[0] == 10 * 4 else up + 10

    monkeypatch.setattr(engine, "_upsample_maps", wrong_unless_whole_batch)
    monkeypatch.setattr(engine._MapUpsampler, "_verdicts", {})
    counts = count_pass(model, ds, ["coarse"], {"coarse": ref["t"]}, batch_size=10, device="cpu")["coarse"]
    assert calls.count(10 * 4) == 3 and len(calls) == 4
    np.testing.assert_array_equal(counts.intersection.numpy()[:, 1:], ref["inter"])
    np.testing.assert_array_equal(counts.act_area.numpy(), ref["act"])


@pytest.mark.parametrize(
    "native_size,size",
    [((8, 8), (32, 32)), ((4, 4), (8, 8)), ((7, 7), (56, 56)), ((6, 9), (50, 37)), ((3, 3), (7, 11))],
)
def test_upsampling_some_rows_gives_the_same_values(native_size: tuple[int, int], size: tuple[int, int]) -> None:
    """The kept rows of a map, computed alone, equal those rows of the whole batch upsampled."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(9, 40, *native_size, generator=gen).relu_() * 7
    full = torch.cat([up for _, up in engine._chunks(a, size)]).view(9 * 40, size[0], size[1])
    ups = engine._MapUpsampler(size)
    h, w, th, tw = *native_size, *size
    columns_first = th * h * w + th * w * tw > h * w * tw + th * h * tw
    assert ups._rows_eligible(a) == (not columns_first)
    if columns_first:  # upsample blends columns first for this shape: rows are not computed alone
        return
    for n in (1, 3, 63, 64, 65, 200, 360):
        pick = torch.randperm(9 * 40, generator=gen)[:n]
        for frac in (0.02, 0.3, 1.0):
            keep = torch.rand(n, size[0], generator=gen) < frac
            idx = keep.view(-1).nonzero().squeeze(1)
            rows = ups._upsample_rows(a.view(-1, *native_size)[pick], idx)
            assert torch.equal(rows, full[pick].reshape(-1, size[1])[idx])


def test_the_subset_check_compares_the_first_chunk_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first subset of a batch is checked against the whole batch's first chunk only
    (bounded memory); maps outside it, or a subset with none in it, get whole-batch values."""
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", 3 * 5 * 256)  # 3 images of 5 units per chunk
    monkeypatch.setattr(engine._MapUpsampler, "_verdicts", {})
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(10, 5, 4, 4, generator=gen).relu_()
    full = torch.cat([up for _, up in engine._chunks(a, (16, 16))])
    ups = engine._MapUpsampler((16, 16))
    later = torch.tensor([4, 7, 9]), torch.tensor([0, 3, 1])  # no map in the first chunk
    got = list(ups.rows(a, *later))
    assert not ups.checked and engine._MapUpsampler._verdicts == {}
    for b, u, native, up in got:
        assert torch.equal(up, full[b, u]) and torch.equal(native, a[b, u])
    assert sorted(torch.cat([b for b, *_ in got]).tolist()) == [4, 7, 9]
    bi, ui = torch.tensor([0, 2, 5, 9]), torch.tensor([1, 4, 2, 0])
    got = list(ups.rows(a, bi, ui))
    assert ups.checked and list(engine._MapUpsampler._verdicts.values()) == [True]
    assert got[0][0].tolist() == [0, 2]  # the first chunk's maps, compared, come first
    for b, u, _native, up in got:
        assert torch.equal(up, full[b, u])
    assert sorted(torch.cat([b for b, *_ in got]).tolist()) == [0, 2, 5, 9]


def test_only_kept_rows_are_upsampled_and_a_difference_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes upsample only the rows they keep once whole maps agreed on the first batch;
    were those rows ever to differ from whole maps, the first comparison notices and the
    results stay exact."""
    model, ds = net(), Blocks()
    ref = reference(ds, "coarse", 0.8)
    real = engine._MapUpsampler._upsample_rows
    calls: list[int] = []

    def spy(self: engine._MapUpsampler, native: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        calls.append(idx.numel())
        return real(self, native, idx)

    monkeypatch.setattr(fused, "_enabled", False)  # the products' path (the fused loops make parts of rows)
    monkeypatch.setattr(engine._MapUpsampler, "_upsample_rows", spy)
    monkeypatch.setattr(engine._MapUpsampler, "_verdicts", {})
    monkeypatch.setattr(engine._MapUpsampler, "_row_verdicts", {})
    result = dissect(model, ds, ["coarse"], quantile=0.8, batch_size=4, device="cpu")["coarse"]
    assert len(calls) > 3 and list(engine._MapUpsampler._row_verdicts.values()) == [True]
    np.testing.assert_array_equal(result.thresholds, ref["t"])
    np.testing.assert_array_equal(result.intersection, ref["inter"])

    def off(self: engine._MapUpsampler, native: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        calls.append(idx.numel())
        return real(self, native, idx) + 1.0

    calls.clear()
    monkeypatch.setattr(engine._MapUpsampler, "_upsample_rows", off)
    monkeypatch.setattr(engine._MapUpsampler, "_row_verdicts", {})
    result = dissect(model, ds, ["coarse"], quantile=0.8, batch_size=4, device="cpu")["coarse"]
    assert len(calls) == 1 and list(engine._MapUpsampler._row_verdicts.values()) == [False]
    np.testing.assert_array_equal(result.thresholds, ref["t"])
    np.testing.assert_array_equal(result.intersection, ref["inter"])
    np.testing.assert_array_equal(result.act_area, ref["act"])


def test_top_maps_are_the_native_maps_of_the_top_images() -> None:
    model, ds = net(), Blocks()
    for layer in ("units", "coarse"):
        result = dissect(model, ds, [layer], quantile=0.9, batch_size=4, device="cpu", top_k_images=3)[layer]
        assert result.top_maps is not None and result.top_maps.dtype == np.float32
        a = native(ds, layer).astype(np.float32)
        assert result.top_maps.shape == (4, 3, *a.shape[2:])
        expected = np.stack([a[result.top_images[u], u] for u in range(4)])
        np.testing.assert_array_equal(result.top_maps, expected)
        np.testing.assert_array_equal(result.top_maps.max(axis=(2, 3)), result.top_values)


def test_top_maps_merge_across_shards_like_a_single_run() -> None:
    model, ds = net(), Blocks(n=23)
    layers = ["coarse", "units"]
    single = dissect(model, ds, layers, quantile=0.95, batch_size=4, device="cpu", top_k_images=4)
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
    parts = [
        count_pass(model, ds, layers, thresholds, indices=s, batch_size=5, device="cpu", top_k_images=4) for s in shards
    ]
    parts = [{k: ConceptCounts.from_state_dict(v.state_dict()) for k, v in p.items()} for p in parts]
    counts = merged([{k: ConceptCounts(v.units, v.num_concepts) for k, v in parts[0].items()}, *parts])
    for layer in layers:
        res = finalize(layer, thresholds[layer], counts[layer], ds.concepts, quantile=0.95)
        np.testing.assert_array_equal(res.top_images, single[layer].top_images)
        np.testing.assert_array_equal(res.top_values, single[layer].top_values)
        assert res.top_maps is not None
        np.testing.assert_array_equal(res.top_maps, single[layer].top_maps)
        np.testing.assert_array_equal(res.intersection, single[layer].intersection)


def test_top_activations_keep_maps_consistent_with_ties() -> None:
    maps = torch.arange(4 * 2 * 2 * 2, dtype=torch.float32).view(4, 2, 2, 2)
    peaks = torch.tensor([[1.0, 5.0], [3.0, 5.0], [3.0, 1.0], [2.0, 0.0]])
    top = TopActivations(2, 2)
    top.add(peaks[:2], torch.tensor([10, 11]), maps[:2])
    other = TopActivations(2, 2)
    other.add(peaks[2:], torch.tensor([7, 8]), maps[2:])
    top.merge(other)
    assert top.indices.tolist() == [[7, 11], [10, 11]]
    assert top.maps is not None
    torch.testing.assert_close(top.maps[0], torch.stack([maps[2, 0], maps[1, 0]]))
    torch.testing.assert_close(top.maps[1], torch.stack([maps[0, 1], maps[1, 1]]))
    again = TopActivations.from_state_dict(top.state_dict())
    assert again.maps is not None and torch.equal(again.maps, top.maps)
    without = TopActivations(2, 2)
    without.add(peaks[:2], torch.tensor([10, 11]))
    assert without.maps is None
    assert without.merge(other).maps is None and without.indices.tolist() == top.indices.tolist()
    fresh = TopActivations(2, 2).merge(other)
    assert fresh.maps is not None and torch.equal(fresh.maps, other.maps)


def test_pictures_from_top_maps_need_no_forward_pass(tmp_path: Path) -> None:
    model, ds = net(), Blocks()
    result = dissect(model, ds, ["coarse"], quantile=0.9, device="cpu", top_k_images=3)["coarse"]
    assert result.top_maps is not None
    calls: list[int] = []
    handle = model.module.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        picture = top_images_strip(model, ds, result, 0, scale=2)
        paths = save_unit_strips(model, ds, result, tmp_path / "maps", units=[0, 2, 3], units_per_pass=2)
    finally:
        handle.remove()
    assert calls == []
    bare = dataclasses.replace(result, top_maps=None)
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(top_images_strip(model, ds, bare, 0, scale=2)))
    again = save_unit_strips(model, ds, bare, tmp_path / "forward", units=[0, 2, 3], units_per_pass=2)
    assert [p.name for p in paths] == [p.name for p in again] == ["unit_0000.png", "unit_0002.png", "unit_0003.png"]
    for a, b in zip(paths, again):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


class Ragged(Blocks):
    """Like :class:`Blocks`, but images carry 0, 1 or 2 label maps and 0-2 whole-image labels."""

    def __getitem__(self, index: int) -> Sample:
        k = index % 3
        maps = np.concatenate([self.maps[index]] * 2)[:k] if index % 5 else np.zeros((0, 8, 8), np.int32)
        maps = maps.copy()
        if maps.shape[0] == 2:
            maps[1] = (maps[1] + 1) % 5
        labels = np.array([1, 3][: index % 3], np.int32)
        return Sample(self.images[index], maps, labels, -1)


def test_grouped_count_pass_equals_batch_by_batch() -> None:
    """Ragged label maps (0-2 per image, whole-image labels) count the same from the cache."""
    model, ds = net(), Ragged(n=41)
    for layer in ("coarse", "units"):
        result = dissect(model, ds, [layer], quantile=0.9, batch_size=2, device="cpu")[layer]
        fresh = count_pass(model, ds, [layer], {layer: result.thresholds}, batch_size=3, device="cpu")[layer]
        np.testing.assert_array_equal(result.intersection, fresh.intersection.numpy()[:, 1:])
        np.testing.assert_array_equal(result.act_area, fresh.act_area.numpy())
        np.testing.assert_array_equal(result.concept_area, fresh.concept_area.numpy()[1:])
        assert result.n_images == 41 and result.concept_area.sum() > 0

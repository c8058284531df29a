"""Label evidence (dissect_core.evidence): known answers on masks drawn by hand.

Units here are "on" masks built directly (a concept's own mask, noise upsampled and
thresholded as the method does, the union of two concepts), counted by ConceptCounts
in batches with their dataset indices, then checked against what the evidence must say.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dissect_core.counts import ConceptCounts
from dissect_core.evidence import cell_grid, image_blocks, label_evidence
from dissect_core.upsample import upsample

SIZE = 32


def _rects(rng: np.random.Generator, n: int, share: float, lo: int = 6, hi: int = 14) -> np.ndarray:
    """bool [n, SIZE, SIZE]: one random rectangle in a ``share`` of the images."""
    out = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n):
        if rng.random() < share:
            h, w = rng.integers(lo, hi, size=2)
            y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
            out[i, y : y + h, x : x + w] = True
    return out


def _count(on: np.ndarray, concept_masks: list[np.ndarray], *, batch: int = 37, blocks: int = 16) -> ConceptCounts:
    """Count on [N, U, h, w] against concepts 1..C given as bool [N, h, w] masks (one label
    map per concept), in batches, with dataset indices 0..N-1."""
    n, units = on.shape[:2]
    maps = np.stack([m * (c + 1) for c, m in enumerate(concept_masks)], axis=1).astype(np.int64)
    counts = ConceptCounts(units, len(concept_masks), blocks=blocks)
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        counts.add(
            torch.as_tensor(on[sl]),
            torch.as_tensor(maps[sl]),
            indices=torch.arange(start, min(n, start + batch)),
        )
    return counts


def test_blocks_are_fixed_by_index_and_look_random():
    idx = np.arange(100_000)
    blocks = image_blocks(idx, 16)
    np.testing.assert_array_equal(blocks[123:456], image_blocks(np.arange(123, 456), 16))
    share = np.bincount(blocks, minlength=16) / len(idx)
    assert np.abs(share - 1 / 16).max() < 0.005
    # consecutive indices are not striped: neighbours share a block about 1 time in 16
    assert abs(np.mean(blocks[1:] == blocks[:-1]) - 1 / 16) < 0.01


def test_cell_grid_covers_the_mask():
    cell, g = cell_grid((SIZE, SIZE))
    assert g == 64 and cell.shape == (SIZE * SIZE,)
    np.testing.assert_array_equal(np.bincount(cell), np.full(64, 16))
    cell, g = cell_grid((3, 5))
    assert g == 15 and sorted(set(cell.tolist())) == list(range(15))


def test_block_tallies_sum_to_the_plain_counts():
    rng = np.random.default_rng(0)
    concepts = [_rects(rng, 90, 0.6), _rects(rng, 90, 0.4)]
    on = np.stack([concepts[0], _rects(rng, 90, 0.5)], axis=1)
    one = _count(on, concepts, blocks=1)
    many = _count(on, concepts, blocks=16)
    np.testing.assert_array_equal(one.intersection, many.intersection)
    np.testing.assert_array_equal(one.act_area, many.act_area)
    np.testing.assert_array_equal(one.concept_area, many.concept_area)
    assert many.intersection[0, 1] == concepts[0].sum()
    assert int(many.block_images.sum()) == 90 and (many.block_images > 0).sum() >= 14


def test_unit_equal_to_a_concept_mask():
    rng = np.random.default_rng(1)
    concepts = [_rects(rng, 400, 0.5), _rects(rng, 400, 0.5), _rects(rng, 400, 0.3)]
    exact = concepts[1]
    ev = _count(exact[:, None], concepts).evidence(resamples=500)
    assert ev.label[0] == 1 and ev.iou[0] == 1.0
    assert ev.stability[0] == 1.0 and ev.contenders[0] == 1
    assert ev.iou_low[0] == ev.iou_high[0] == 1.0
    assert ev.p_value[0] < 1e-6
    assert ev.chance_iou[0] < 0.2
    assert ev.runner_up[0] in (0, 2) and ev.margin[0] > 0.5

    # Nearly equal (a few stray blobs): the interval holds the IoU and shrinks with more images.
    stray = _rects(np.random.default_rng(2), 400, 0.15, 3, 6)
    near = (exact | stray)[:, None]
    widths = []
    for n in (100, 400):
        ev = _count(near[:n], [c[:n] for c in concepts]).evidence(resamples=500)
        assert ev.label[0] == 1 and ev.stability[0] == 1.0 and ev.p_value[0] < 1e-6
        assert ev.iou_low[0] <= ev.iou[0] <= ev.iou_high[0] < 1.0
        widths.append(ev.iou_high[0] - ev.iou_low[0])
    assert widths[1] < 0.75 * widths[0]


def _noise_on(rng: np.random.Generator, n: int, units: int, native: int = 8) -> np.ndarray:
    """The method on noise: native maps upsampled to the mask size (zero padding), on above
    each unit's 0.99 hazen quantile over every pixel of every image."""
    maps = torch.as_tensor(rng.standard_normal((n, units, native, native)), dtype=torch.float32)
    up = upsample(maps, (SIZE, SIZE)).numpy()
    t = np.quantile(up.transpose(1, 0, 2, 3).reshape(units, -1), 0.99, axis=1, method="hazen")
    return up > t[None, :, None, None]


def test_noise_units_are_at_chance():
    """Units independent of every mask: p above 0.05 and the chance level inside the
    label IoU's interval, in at least 90% of cases (seeds x units)."""
    results = []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        concepts = [_rects(rng, 300, 0.5), _rects(rng, 300, 0.4, 4, 10), _rects(rng, 300, 0.3, 8, 20)]
        ev = _count(_noise_on(rng, 300, 3), concepts).evidence(resamples=400)
        for u in range(3):
            assert ev.label[u] >= 0
            results.append((ev.p_value[u] > 0.05, ev.iou_low[u] <= ev.chance_iou[u] <= ev.iou_high[u]))
    above, inside = np.mean(results, axis=0)
    assert above >= 0.9, f"p > 0.05 in only {above:.0%} of noise units"
    assert inside >= 0.9, f"chance inside the interval in only {inside:.0%} of noise units"
    # Ten concepts alike: the label is the best of many chance IoUs; the p-value allows for
    # that choice (Sidak over the concepts that won a resample), so it stays above 0.05.
    above = []
    for seed in range(8):
        rng = np.random.default_rng(300 + seed)
        ev = _count(_noise_on(rng, 300, 3), [_rects(rng, 300, 0.5) for _ in range(10)]).evidence(resamples=300)
        above += list(ev.p_value > 0.05)
        assert (ev.contenders >= 1).all()
    assert np.mean(above) >= 0.9, f"p > 0.05 in only {np.mean(above):.0%} of noise units (10 concepts)"


def test_tied_concepts():
    rng = np.random.default_rng(3)
    base = _rects(rng, 300, 0.6)
    # Identical masks: an exact tie in every resample counts half each.
    ev = _count(base[:, None], [base, base.copy(), _rects(rng, 300, 0.5)]).evidence(resamples=300)
    assert ev.label[0] == 0 and ev.runner_up[0] == 1
    assert ev.stability[0] == pytest.approx(0.5) and ev.margin[0] == 0.0
    # Two concepts tied by construction on different images: each image pair (2k, 2k + 1)
    # holds one rectangle, as concept a in the first image and concept b in the second; the
    # unit is on both. Both IoUs are 1/2 on all images; resamples split them about evenly.
    for seed in range(4):
        rng = np.random.default_rng(200 + seed)
        rect = _rects(rng, 150, 0.8)
        a, b = np.zeros((300, SIZE, SIZE), bool), np.zeros((300, SIZE, SIZE), bool)
        a[0::2], b[1::2] = rect, rect
        ev = _count((a | b)[:, None], [a, b, _rects(rng, 300, 0.5)]).evidence(resamples=400)
        assert ev.iou[0] == ev.runner_up_iou[0] == 0.5
        assert (ev.label[0], ev.runner_up[0]) == (0, 1)
        assert 0.35 <= ev.stability[0] <= 0.65, ev.stability[0]
    # The same with the columns swapped: the other concept is the label, the first its runner-up.
    ev = _count((a | b)[:, None], [b, a]).evidence(resamples=400)
    assert (ev.label[0], ev.runner_up[0]) == (0, 1) and 0.35 <= ev.stability[0] <= 0.65


def test_sharded_counts_give_the_same_evidence():
    rng = np.random.default_rng(4)
    concepts = [_rects(rng, 200, 0.5), _rects(rng, 200, 0.4)]
    on = np.concatenate([_noise_on(rng, 200, 2), (concepts[0] | _rects(rng, 200, 0.2, 3, 6))[:, None]], axis=1)
    whole = _count(on, concepts)
    maps = np.stack([m * (c + 1) for c, m in enumerate(concepts)], axis=1).astype(np.int64)
    parts = []
    for idx in (np.arange(0, 200, 3), np.setdiff1d(np.arange(200), np.arange(0, 200, 3))):
        part = ConceptCounts(3, 2)
        part.add(torch.as_tensor(on[idx]), torch.as_tensor(maps[idx]), indices=torch.as_tensor(idx))
        parts.append(ConceptCounts.from_state_dict(part.state_dict()))
    merged = parts[0].merge(parts[1])
    a, b = whole.evidence(resamples=300, seed=7), merged.evidence(resamples=300, seed=7)
    for name in ("label", "iou", "iou_low", "iou_high", "stability", "runner_up", "chance_iou", "p_value", "low"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_degenerate_inputs():
    # No image in more than one block: no interval, no stability, no p-value; labels still stand.
    inter = np.array([[[3, 0]]])
    ev = label_evidence(inter, np.array([[[3]]]), np.array([[[4], [2]]]), np.array([5]), np.array([10]))
    assert ev.label[0] == 0 and np.isnan(ev.stability[0]) and np.isnan(ev.p_value[0])
    # A unit that is never on has no label and no evidence.
    on = np.zeros((40, 1, SIZE, SIZE), bool)
    ev = _count(on, [_rects(np.random.default_rng(5), 40, 0.5)]).evidence(resamples=50)
    assert ev.label[0] == -1 and np.isnan(ev.iou_low[0]) and ev.unit(0)["p_value"] is None


def test_the_interval_is_the_jackknife_with_students_t_by_hand():
    """One unit, two concepts, four blocks of one cell: each IoU's interval is its IoU plus or
    minus t(0.975, 3) times the delete-one-block jackknife spread, computed here by hand."""
    from scipy.stats import t as student_t

    inter = np.array([[[5, 1]], [[7, 0]], [[4, 2]], [[6, 1]]])  # [blocks, U, C]
    act = np.array([[[9]], [[11]], [[8]], [[10]]])  # [blocks, U, G]
    con = np.array([[[12], [6]], [[10], [5]], [[9], [7]], [[13], [4]]])  # [blocks, C, G]
    ev = label_evidence(inter, act, con, np.array([3, 3, 3, 3]), np.array([100]), resamples=20)
    i, a, c = inter[:, 0, :].astype(float), act[:, 0, 0].astype(float), con[:, :, 0].astype(float)
    iou = i.sum(0) / (a.sum() + c.sum(0) - i.sum(0))
    loo = np.stack([(i.sum(0) - i[b]) / (a.sum() - a[b] + c.sum(0) - c[b] - i.sum(0) + i[b]) for b in range(4)])
    spread = student_t.ppf(0.975, 3) * np.sqrt(3 / 4 * ((loo - loo.mean(0)) ** 2).sum(0))
    np.testing.assert_allclose(ev.low[0], np.clip(iou - spread, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(ev.high[0], np.clip(iou + spread, 0, 1), rtol=1e-6)
    assert ev.label[0] == 0

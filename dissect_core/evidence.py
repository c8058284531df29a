"""Evidence behind each unit's label: a confidence interval, a stability score, the runner-up,
and a chance level with a p-value, all from the integer tallies of the count pass.

Images are dealt into ``blocks`` fixed blocks by a hash of their dataset index
(:func:`image_blocks`), so the block of an image does not depend on batching or on
sharding. :class:`~dissect_core.counts.ConceptCounts` keeps its tallies per block:
intersections [blocks, U, C + 1], and the on-pixels of each unit and the pixels of each
concept per block and per cell of a coarse grid over the mask (at most
:data:`GRID` x :data:`GRID` cells). These are exact integers that merge across shards
by addition, and their sums are the dataset-level counts the labels come from, so the
labels and IoUs are unchanged.

From them, per unit (:func:`label_evidence`):

- ``iou_low``, ``iou_high``: a percentile bootstrap interval (95% by default) of the
  label's IoU: ``resamples`` times, draw the non-empty blocks with replacement, sum
  their tallies and recompute every IoU (seeded: the same seed gives the same numbers).
- ``stability``: the share of those resamples in which the label stays the argmax over
  all concepts (a resample where k concepts tie for the top counts 1/k).
- ``runner_up``, ``runner_up_iou``: the concept with the second-highest IoU on all
  images (ties: the lower column, as for the label).
- ``chance_iou``: the IoU the unit's on-pixels would reach with the concept if they
  were independent of the concept's pixels given the position on the grid: with a_g
  and s_g the on-pixels and concept pixels in cell g over all n images, and P_g the
  pixels of cell g in one image, the expected intersection is
  E = sum_g a_g s_g / (n P_g) (the mean over pairings of each image's on-pixels with
  another image's concept pixels, positions uniform within a cell), and
  ``chance_iou = E / (A + S - E)``. A unit that fires where the concept usually is
  (sky at the top) is at chance; one that fires on the concept's pixels is not.
- ``p_value``: one-sided, of "IoU - chance_iou <= 0": the difference divided by its
  delete-one-block jackknife standard error, referred to Student's t with
  (non-empty blocks - 1) degrees of freedom. Blocks hold whole images, so the error
  carries the spatial correlation of masks and maps within an image; images are
  treated as independent draws.

The assumptions are the bootstrap's: images are an independent sample, and
``blocks`` blocks are enough to see their spread (fewer than 2 non-empty blocks give
no evidence: NaN).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import fused

__all__ = [
    "DEFAULT_BLOCKS",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "GRID",
    "LabelEvidence",
    "cell_grid",
    "image_blocks",
    "label_evidence",
]

DEFAULT_BLOCKS = 16
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
GRID = 8
_CONFIDENCE = 0.95
_CHUNK_VALUES = 1 << 24
_PAIR_CHUNK_VALUES = 1 << 18  # resampled IoUs per step of the stability loop: small enough to stay in cache

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)


def image_blocks(indices: Any, blocks: int) -> np.ndarray:
    """The block of each dataset index: a fixed 64-bit mix of the index (murmur3's
    finaliser), modulo ``blocks``; random-looking, so a block is a random sample of images
    whatever order the dataset keeps them in (a dataset sorted by class is not striped).

    Args:
        indices: integer dataset indices (array-like or tensor).
        blocks: number of blocks (>= 1).

    Returns:
        int64 array of blocks in [0, blocks).
    """
    x = np.asarray(indices.cpu() if hasattr(indices, "cpu") else indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(33))
        x = x * _M1
        x = x ^ (x >> np.uint64(33))
        x = x * _M2
        x = x ^ (x >> np.uint64(33))
    return (x % np.uint64(blocks)).astype(np.int64)


def cell_grid(size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The grid cell of each pixel of an h x w mask (row-major), and the number of cells.

    The grid is min(GRID, h) x min(GRID, w); pixel (y, x) is in cell
    (y * gh // h) * gw + (x * gw // w).
    """
    h, w = size
    gh, gw = min(GRID, h), min(GRID, w)
    ys = np.arange(h) * gh // h
    xs = np.arange(w) * gw // w
    return (ys[:, None] * gw + xs[None, :]).reshape(-1).astype(np.int64), gh * gw


@dataclass
class LabelEvidence:
    """The evidence behind each unit's label (see module docstring); arrays of length U.

    Units without a label (no concept above IoU 0) have ``label`` and ``runner_up`` -1
    and NaN statistics; a unit whose only concept with IoU > 0 is the label has
    ``runner_up`` -1 only when there is no other concept at all.

    Attributes:
        label: int64, the label's column (the argmax, ties to the lower column).
        iou: the label's IoU on all images.
        iou_low, iou_high: the label IoU's bootstrap interval.
        stability: share of resamples where the label stays the argmax.
        runner_up: int64, the second-best concept's column.
        runner_up_iou: its IoU; ``margin`` = iou - runner_up_iou.
        chance_iou: the label's IoU under independence given position.
        p_value: one-sided p of IoU above chance.
        low, high: float32 [U, C] bootstrap intervals of every unit x concept IoU.
        blocks: non-empty blocks; resamples, seed, confidence: as used.
    """

    label: np.ndarray
    iou: np.ndarray
    iou_low: np.ndarray
    iou_high: np.ndarray
    stability: np.ndarray
    runner_up: np.ndarray
    runner_up_iou: np.ndarray
    chance_iou: np.ndarray
    p_value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    blocks: int
    resamples: int
    seed: int
    confidence: float = _CONFIDENCE
    contenders: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def margin(self) -> np.ndarray:
        """iou - runner_up_iou (NaN without a runner-up)."""
        return self.iou - self.runner_up_iou

    def arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays to store: the per-unit columns ([U]; runner_up as a column, -1 none) and
        the interval matrices ``low``/``high`` [U, C]."""
        return {
            "iou_low": self.iou_low,
            "iou_high": self.iou_high,
            "stability": self.stability,
            "runner_up": self.runner_up,
            "runner_up_iou": self.runner_up_iou,
            "chance_iou": self.chance_iou,
            "p_value": self.p_value,
            "low": self.low,
            "high": self.high,
        }

    def counts(self, min_iou: float = 0.04, max_p: float = 0.01, min_stability: float = 0.9) -> dict[str, Any]:
        """Label counts beside the paper's detector count: units with p below ``max_p``, and
        detectors (IoU >= ``min_iou``) that also have it or are stable."""
        labelled = self.label >= 0
        detector = labelled & (np.nan_to_num(self.iou) >= min_iou)
        significant = labelled & (np.nan_to_num(self.p_value, nan=1.0) < max_p)
        stable = labelled & (np.nan_to_num(self.stability) >= min_stability)
        return {
            "blocks": self.blocks,
            "resamples": self.resamples,
            "seed": self.seed,
            "max_p": max_p,
            "min_stability": min_stability,
            "significant": int(significant.sum()),
            "detectors_significant": int((detector & significant).sum()),
            "detectors_stable": int((detector & stable).sum()),
        }

    def unit(self, u: int) -> dict[str, Any]:
        """One unit's evidence as plain values (None where undefined), without the matrices."""

        def num(x: Any) -> float | None:
            x = float(x)
            return None if np.isnan(x) else x

        return {
            "iou_ci": None if np.isnan(self.iou_low[u]) else [float(self.iou_low[u]), float(self.iou_high[u])],
            "stability": num(self.stability[u]),
            "runner_up": int(self.runner_up[u]),
            "runner_up_iou": num(self.runner_up_iou[u]),
            "margin": num(self.margin[u]),
            "chance_iou": num(self.chance_iou[u]),
            "p_value": num(self.p_value[u]),
        }


def _iou(inter: np.ndarray, act: np.ndarray, con: np.ndarray) -> np.ndarray:
    union = act + con - inter
    return np.divide(inter, union, out=np.zeros(np.broadcast_shapes(inter.shape, union.shape)), where=union > 0)


def _chance(act_cells: np.ndarray, con_cells: np.ndarray, images: float, cell_pixels: np.ndarray) -> np.ndarray:
    """Expected intersections [...] from on-pixels [..., G] and concept pixels [..., G] per cell."""
    if images <= 0:
        return np.zeros(act_cells.shape[:-1])
    return (act_cells * con_cells / (images * cell_pixels)).sum(-1)


def label_evidence(
    block_intersection: np.ndarray,
    block_act: np.ndarray,
    block_concept: np.ndarray,
    block_images: np.ndarray,
    cell_pixels: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = _CONFIDENCE,
) -> LabelEvidence:
    """Compute every unit's label evidence from per-block tallies (see module docstring).

    Args:
        block_intersection: int [nb, U, C]: on-pixels of u carrying concept c, per block
            (concept columns 1..C, without the "none" column).
        block_act: int [nb, U, G]: on-pixels per block and grid cell.
        block_concept: int [nb, C, G]: concept pixels per block and grid cell.
        block_images: int [nb]: images per block.
        cell_pixels: int [G]: pixels of each grid cell in one image.
        resamples: bootstrap resamples (>= 1).
        seed: the resampling seed.
        confidence: the interval's coverage.

    Returns:
        the :class:`LabelEvidence`.
    """
    # Student's t through scipy.special (what scipy.stats.t's sf and ppf call): importing
    # scipy.stats costs a dissecting process about half a second of start-up.
    from scipy.special import stdtr, stdtrit

    _, units, n_concepts = block_intersection.shape
    keep = np.asarray(block_images) > 0
    inter_b = block_intersection[keep].astype(np.float64)
    act_cb = block_act[keep].astype(np.float64)
    con_cb = block_concept[keep].astype(np.float64)
    img_b = np.asarray(block_images, dtype=np.float64)[keep]
    cells = np.asarray(cell_pixels, dtype=np.float64)
    m = int(keep.sum())
    act_b, con_b = act_cb.sum(2), con_cb.sum(2)
    inter, act, con = inter_b.sum(0), act_b.sum(0), con_b.sum(0)
    iou = _iou(inter, act[:, None], con[None, :])
    nan = np.full(units, np.nan)
    ev = LabelEvidence(
        label=np.full(units, -1, np.int64),
        iou=nan.copy(),
        iou_low=nan.copy(),
        iou_high=nan.copy(),
        stability=nan.copy(),
        runner_up=np.full(units, -1, np.int64),
        runner_up_iou=nan.copy(),
        chance_iou=nan.copy(),
        p_value=nan.copy(),
        low=np.full((units, n_concepts), np.nan, np.float32),
        high=np.full((units, n_concepts), np.nan, np.float32),
        blocks=m,
        resamples=int(resamples),
        seed=int(seed),
        confidence=float(confidence),
    )
    if n_concepts == 0 or units == 0:
        return ev
    label = np.argmax(iou, axis=1)
    rows = np.arange(units)
    labelled = iou[rows, label] > 0
    ev.label = np.where(labelled, label, -1)
    ev.iou = np.where(labelled, iou[rows, label], np.nan)
    if n_concepts > 1:
        rest = iou.copy()
        rest[rows, label] = -np.inf
        second = np.argmax(rest, axis=1)
        ev.runner_up = np.where(labelled, second, -1)
        ev.runner_up_iou = np.where(labelled, iou[rows, second], np.nan)
    if m < 2:
        return ev

    # Chance level and its jackknife p-value, for the label column only.
    lab_act_cells = act_cb.sum(0)  # [U, G]
    lab_con_cells = con_cb.sum(0)[label]  # [U, G]
    images = float(img_b.sum())
    expected = _chance(lab_act_cells, lab_con_cells, images, cells)
    lab_con = con[label]
    chance = _iou(expected, act, lab_con)
    observed = iou[rows, label]
    diff = observed - chance
    loo = np.empty((m, units))
    for b in range(m):
        a_c = lab_act_cells - act_cb[b]
        s_c = lab_con_cells - con_cb[b][label]
        e = _chance(a_c, s_c, images - img_b[b], cells)
        a, s = act - act_b[b], lab_con - con_b[b][label]
        i = inter[rows, label] - inter_b[b][rows, label]
        loo[b] = _iou(i, a, s) - _iou(e, a, s)
    se = np.sqrt((m - 1) / m * ((loo - loo.mean(0)) ** 2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        tstat = diff / se
    p = stdtr(m - 1, -tstat)  # the survival function
    p = np.where(se > 0, p, np.where(diff > 0, 0.0, 1.0))
    ev.chance_iou = np.where(labelled, chance, np.nan)
    ev.p_value = np.where(labelled, p, np.nan)

    # Every unit x concept IoU's interval: delete-one-block jackknife, Student's t.
    tq = float(stdtrit(m - 1, 0.5 + confidence / 2.0))  # the quantile function
    mean = np.zeros((units, n_concepts))
    square = np.zeros((units, n_concepts))
    for b in range(m):
        i = inter - inter_b[b]
        loo_iou = _iou(i, (act - act_b[b])[:, None], (con - con_b[b])[None, :])
        mean += loo_iou
        square += loo_iou * loo_iou
    mean /= m
    spread = tq * np.sqrt(np.maximum(0.0, (m - 1) * (square / m - mean * mean)))
    ev.low = np.clip(iou - spread, 0.0, 1.0).astype(np.float32)
    ev.high = np.clip(iou + spread, 0.0, 1.0).astype(np.float32)

    # Bootstrap: resample the non-empty blocks. The label IoU's percentile interval; its
    # stability, against the concepts that can reach the label's IoU in some resample: a
    # resample's IoU is a ratio of weighted sums of the blocks' intersections and unions, so
    # it is at most the blocks' highest IoU, and a concept whose highest block IoU is below
    # the label's lowest resampled IoU never reaches the label in a resample.
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(m, np.full(m, 1.0 / m), size=int(resamples)).astype(np.float64)  # [R, m]
    act_r = weights @ act_b  # [R, U]
    con_r = weights @ con_b  # [R, C]
    lab_r = _iou(weights @ inter_b[:, rows, label], act_r, con_r[:, label])  # [R, U]
    alpha = (1.0 - confidence) / 2.0
    label_low, label_high = np.quantile(lab_r, [alpha, 1.0 - alpha], axis=0)
    pair_unit, pair_concept = _contenders(inter_b, act_b, con_b, label, labelled, lab_r.min(axis=0))
    # Resample-minor layout ([pairs or units, R]): gathering rows is a contiguous copy.
    w_t = torch.as_tensor(weights.T.copy())  # [m, R]
    act_t, con_t, lab_t = (torch.as_tensor(np.ascontiguousarray(x.T)) for x in (act_r, con_r, lab_r))
    n_res = weights.shape[0]
    step = max(1, _PAIR_CHUNK_VALUES // max(1, n_res))

    def pair_iou(sl: slice | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pu, pc = torch.as_tensor(pair_unit[sl]), torch.as_tensor(pair_concept[sl])
        i_r = torch.as_tensor(inter_b[:, pair_unit[sl], pair_concept[sl]].T.copy()) @ w_t  # [p, R]
        union = act_t.index_select(0, pu) + con_t.index_select(0, pc) - i_r
        return torch.where(union > 0, i_r / union, 0.0), pu

    if fused.available():  # one compiled pass per pair, the same comparisons (fused.contend)
        inter_p = inter_b[:, pair_unit, pair_concept].T
        above_np, level_np, reach = fused.contend(
            inter_p, w_t.numpy(), act_t.numpy(), con_t.numpy(), lab_t.numpy(), pair_unit, pair_concept
        )
        above, ties = torch.from_numpy(above_np), torch.from_numpy(level_np).to(torch.float64)
    else:
        best = torch.full((units, n_res), -np.inf, dtype=torch.float64)  # the best other concept, per resample
        reach = np.zeros(len(pair_unit), bool)  # the pair reaches the label's IoU in some resample
        for start in range(0, len(pair_unit), step):
            sl = slice(start, start + step)
            iou_r, pu = pair_iou(sl)
            with warnings.catch_warnings():  # "index_reduce() is in beta" (torch 2.x): the amax reduction is stable
                warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)
                best.index_reduce_(0, pu, iou_r, "amax")
            reach[sl] = (iou_r >= lab_t.index_select(0, pu)).any(dim=1).numpy()
        ties = torch.zeros((units, n_res), dtype=torch.float64)  # other concepts level with the label
        level_units = (best == lab_t).any(dim=1).numpy()
        if level_units.any():  # exact ties are rare: count them in a second pass over those units' pairs
            chosen = np.nonzero(level_units[pair_unit])[0]
            for start in range(0, len(chosen), step):
                iou_r, pu = pair_iou(chosen[start : start + step])
                ties.index_add_(0, pu, (iou_r == lab_t.index_select(0, pu)).to(torch.float64))
        above = best > lab_t
    share = torch.where(above, 0.0, 1.0 / (1.0 + ties)).mean(dim=1).numpy()
    contenders = 1 + np.bincount(pair_unit[reach], minlength=units)
    ev.iou_low = np.where(labelled, label_low, np.nan)
    ev.iou_high = np.where(labelled, label_high, np.nan)
    ev.stability = np.where(labelled, share, np.nan)
    # The label was picked among the concepts that reach its IoU in some resample: Sidak over those.
    ev.p_value = np.where(labelled, -np.expm1(contenders * np.log1p(-np.minimum(p, 1.0 - 1e-16))), np.nan)
    ev.contenders = np.where(labelled, contenders, 0).astype(np.int64)
    return ev


def _contenders(
    inter_b: np.ndarray,
    act_b: np.ndarray,
    con_b: np.ndarray,
    label: np.ndarray,
    labelled: np.ndarray,
    label_floor: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(unit, concept) pairs, concept not the label, whose highest block IoU (blocks with an
    empty union left out) reaches ``label_floor``, the label's lowest IoU over the resamples
    (no lower than its lowest block IoU); labelled units only."""
    m, units, n_concepts = inter_b.shape
    found_u, found_c = [], []
    step = max(1, _CHUNK_VALUES // max(1, m * n_concepts))
    for start in range(0, units, step):
        sl = slice(start, min(units, start + step))
        union = act_b[:, sl, None] + con_b[:, None, :] - inter_b[:, sl]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = inter_b[:, sl] / union
        empty = union <= 0
        hi = np.where(empty, -np.inf, ratio).max(axis=0)  # [u, C]
        idx = np.arange(sl.stop - sl.start)
        lab = label[sl]
        cand = (hi >= label_floor[sl, None]) & labelled[sl, None]
        cand[idx, lab] = False
        u, c = np.nonzero(cand)
        found_u.append(u + start)
        found_c.append(c)
    return np.concatenate(found_u).astype(np.int64), np.concatenate(found_c).astype(np.int64)

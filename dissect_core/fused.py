"""Fused CPU loops for the per-value work of a dissection (numba, compiled on first use).

The engine's per-value steps are chains of whole-array torch operations: a
comparison, a shift, a subtraction, a clamp, a select and a ``bincount`` each pass
over every value once and allocate a temporary of its size. On the CPU these
passes, not the arithmetic, are the cost. The functions here do the same
integer work in one loop per value, with the same results: they count, and every
count is exact, so the sketch, the thresholds and the IoU are those of the torch
path bit for bit (``tests/core/test_fused.py`` compares the two).

The upsampling (:func:`sketch_parts`, :func:`count_parts`) is made here too, from the
native maps, for only the parts of rows that may hold a value above a level: a
bilinear value blends two native values per direction, so each value is a blend of
two weights per product instead of a dense row of them. A dense product adds the
other terms as exact zeros, so the blend gives its value bit for bit when it rounds
as the product's kernel does: with fused multiply-adds or with each product rounded
(:func:`upsample_parts` takes the ``mode``; the engine finds the one that matches this
machine's products once per map shape, and keeps the products where none does).

The label evidence's bootstrap (:func:`contend`) compares every contending (unit, concept)
pair's IoU with the label's in each resample in one loop per pair; its sums are exact
integers in float64, so its comparisons are the torch chunks' (about 0.33 s -> 0.14 s for
the two layers of the Broden-like benchmark).

They are used when numba can be imported and the data lies on the CPU, unless
``DISSECT_FUSED=0`` (then, and on a GPU, the torch path runs). numba compiles the
loops (:mod:`~dissect_core.fused_kernels`) once per machine (about 14 s) and caches the machine code next to this file
(``__pycache__``), in ``~/.cache/numba`` where that is read-only, or in
``NUMBA_CACHE_DIR``; a process loads them in about 0.7 s (:func:`warm`).

The count's parts loop (:func:`count_parts`) runs on as many threads as torch's intra-op
pool (:func:`split_tallies`: chunks of maps dealt out, each thread with its own integer
tallies, summed at the end): on the 2-CPU development machine the count of the Broden-like
benchmark took 0.39-0.44 s against 0.65-0.79 s on one thread. The sketch's loops run on one
thread: making the next chunk's parts on a second thread while the first buckets the last
one slowed both loops (0.58 s and 0.43 s against 0.38 s and 0.36 s) and the sketch as a
whole (0.90 s against 0.85 s).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "Interpolation",
    "Parts",
    "available",
    "contend",
    "count_parts",
    "count_rows",
    "floored_bucket",
    "floored_stats",
    "set_enabled",
    "set_threads",
    "sketch_parts",
    "split_tallies",
    "threads",
    "upsample_parts",
    "warm",
]

_enabled = os.environ.get("DISSECT_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")
_kernels: dict[str, Any] | None = None
_import_error: str | None = None
_threads: int | None = None  # None: torch's intra-op thread count
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)

T = TypeVar("T")
R = TypeVar("R")


def set_enabled(on: bool) -> bool:
    """Turn the fused loops on or off in this process (tests compare both paths).

    Returns:
        The previous setting.
    """
    global _enabled
    before = _enabled
    _enabled = bool(on)
    return before


def set_threads(n: int | None) -> int | None:
    """Set how many threads the parts loops share (``None``: torch's intra-op thread count,
    ``torch.get_num_threads()``, the default; tests compare 1 and several).

    Returns:
        The previous setting.
    """
    global _threads
    before = _threads
    _threads = None if n is None else max(1, int(n))
    return before


def threads() -> int:
    """How many threads the parts loops share now."""
    return _threads if _threads is not None else max(1, torch.get_num_threads())


def _executor(workers: int) -> ThreadPoolExecutor:
    """The module's thread pool with ``workers`` threads, made anew in a forked child (a
    worker process forks after :func:`warm`; threads do not survive a fork)."""
    global _pool
    pid = os.getpid()
    if _pool is None or _pool[0] != pid or _pool[1] != workers:
        if _pool is not None and _pool[0] == pid:
            _pool[2].shutdown(wait=False)
        _pool = (pid, workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dissect-loops"))
    return _pool[2]


def split_tallies(fn: Callable[..., R], items: Iterable[T], tallies: Sequence[torch.Tensor]) -> list[R]:
    """``fn(item, *tallies)`` for every item, the items dealt out to :func:`threads` threads:
    the first adds to ``tallies`` themselves, each other one to zeroed copies of them, added
    into ``tallies`` at the end (integer counts: the sums are those of one thread).

    Returns:
        the results, in the items' order.
    """
    if any(t.is_floating_point() for t in tallies):
        raise TypeError("split_tallies adds integer tallies only (a float sum would depend on the split)")
    if threads() <= 1:  # the items one by one, none held
        return [fn(item, *tallies) for item in items]
    listed = list(items)
    n = min(threads(), len(listed))
    if n <= 1:
        return [fn(item, *tallies) for item in listed]
    copies = [tuple(tallies)] + [tuple(torch.zeros_like(t) for t in tallies) for _ in range(n - 1)]

    def work(j: int) -> list[R]:
        return [fn(item, *copies[j]) for item in listed[j::n]]

    dealt = list(_executor(threads()).map(work, range(n)))
    for extra in copies[1:]:
        for tally, part in zip(tallies, extra, strict=True):
            tally += part
    return [dealt[k % n][k // n] for k in range(len(listed))]


def _compile() -> dict[str, Any] | None:
    global _kernels, _import_error
    if _kernels is not None or _import_error is not None:
        return _kernels
    try:
        from . import fused_kernels
    except ImportError as exc:  # the torch path stands in
        _import_error = str(exc)
        return None
    _kernels = dict(fused_kernels.KERNELS)
    return _kernels


def available(*tensors: torch.Tensor) -> bool:
    """Whether the fused loops run for these tensors: enabled, numba importable, all on the CPU."""
    if not _enabled or any(t.device.type != "cpu" for t in tensors):
        return False
    return _compile() is not None


def _np(t: torch.Tensor) -> np.ndarray:
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.numpy()


def floored_stats(
    rows: torch.Tensor,
    units: torch.Tensor,
    floor: torch.Tensor,
    shift: int,
    pos_top: torch.Tensor,
    neg_top: torch.Tensor,
) -> int:
    """Values above their unit's floor: how many, and each unit's top bucket per sign.

    Args:
        rows: float32 [M, P], contiguous.
        units: int64 [M], the unit of each row.
        floor: float32 [U].
        shift: a value's bucket is its float32 bits (sign cleared) >> shift.
        pos_top: int64 [U], raised in place to the largest bucket of a positive value above
            the floor, per unit.
        neg_top: int64 [U], likewise for the negative values above the floor (by magnitude).

    Returns:
        The number of values above their floor (exact zeros above a floor below 0 included).
    """
    kernels = _compile()
    assert kernels is not None
    return int(
        kernels["stats"](
            _np(rows), _np(rows).view(np.int32), _np(units), _np(floor), np.int64(shift), _np(pos_top), _np(neg_top)
        )
    )


def floored_bucket(
    rows: torch.Tensor,
    units: torch.Tensor,
    floor: torch.Tensor,
    shift: int,
    pos: tuple[torch.Tensor, torch.Tensor],
    neg: tuple[torch.Tensor, torch.Tensor],
    zeros: torch.Tensor,
    floor_count: torch.Tensor,
) -> None:
    """Histogram the values above their unit's floor; count the rest at the floor.

    A positive value above the floor adds one to ``pos[1][u, max((bits >> shift) -
    pos[0][u], 0)]``, a negative one likewise to ``neg`` by its magnitude, an exact
    zero above a floor below 0 to ``zeros[u]``, and every other value to
    ``floor_count[u]``. All in place.

    Args:
        rows: float32 [M, P], contiguous.
        units: int64 [M].
        floor: float32 [U].
        shift: as for :func:`floored_stats`.
        pos: (offset int64 [U], counts int64 [U, W] contiguous) of the positive store;
            every column a value lands in must lie below W.
        neg: the same for the negative store (any int64 arrays when no negative value
            lies above a floor).
        zeros: int64 [U].
        floor_count: int64 [U].
    """
    kernels = _compile()
    assert kernels is not None
    kernels["bucket"](
        _np(rows),
        _np(rows).view(np.int32),
        _np(units),
        _np(floor),
        np.int64(shift),
        _np(pos[0]),
        _np(pos[1]),
        _np(neg[0]),
        _np(neg[1]),
        _np(zeros),
        _np(floor_count),
    )


def count_rows(
    rows: torch.Tensor,
    idx: torch.Tensor,
    images: torch.Tensor,
    units: torch.Tensor,
    cand: torch.Tensor,
    sure: torch.Tensor,
    pixel: torch.Tensor,
    blocks: torch.Tensor,
    cells: torch.Tensor,
    block_act: torch.Tensor,
    block_inter: torch.Tensor,
) -> torch.Tensor:
    """Count the pixels of upsampled map rows that lie above their unit's level.

    Row k of ``rows`` is row ``idx[k] % h`` of map ``m = idx[k] // h`` (h = the mask
    height), the map of unit ``units[m]`` on batch image ``images[m]``. A pixel p above
    ``cand[u]`` and above ``sure[u]`` adds one to ``block_act[block, u, cells[p]]`` and
    to ``block_inter[block, u, c]`` for each entry c of ``pixel[image, p]`` (block =
    ``blocks[image]``), in place; one above ``cand[u]`` but not ``sure[u]`` is returned.

    Args:
        rows: float32 [R, W], contiguous.
        idx: int64 [R].
        images, units: int64 [M], per map.
        cand: float32 [U]; sure: float32 [U] (-inf where every pixel above ``cand`` counts).
        pixel: int32 [B, H * W, L], the batch's deduplicated concepts per pixel.
        blocks: int64 [B]; cells: int64 [H * W].
        block_act: int64 [blocks, U, G]; block_inter: int32 or int64 [blocks, U, C + 1].

    Returns:
        int64 [A]: flat positions (k * W + x) in ``rows`` of the pixels not counted.
    """
    kernels = _compile()
    assert kernels is not None
    height = pixel.shape[1] // rows.shape[1]
    amb = kernels["count"](
        _np(rows),
        _np(idx),
        np.int64(height),
        _np(images),
        _np(units),
        _np(cand),
        _np(sure),
        _np(pixel),
        _np(blocks),
        _np(cells),
        _np(block_act),
        _np(block_inter),
    )
    return torch.from_numpy(amb)


class Interpolation:
    """A separable interpolation for :func:`upsample_parts`, as pairs of weights.

    Args:
        rows: float32 [T_h, S_h] matrix (e.g. :func:`~dissect_core.upsample.interpolation_matrix`),
            at most two nonzero weights per row, and those in adjacent columns.
        cols: float32 [T_w, S_w], the same for the columns.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.height = rows.shape[0]
        self.width = cols.shape[0]
        self.source_width = cols.shape[1]
        self.rows = self._pairs(rows)
        self.cols = self._pairs(cols)
        self._parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _pairs(matrix: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        m = matrix.detach().to("cpu", torch.float32).numpy()
        lo = np.zeros(m.shape[0], np.int64)
        hi = np.zeros(m.shape[0], np.int64)
        w0 = np.zeros(m.shape[0], np.float32)
        w1 = np.zeros(m.shape[0], np.float32)
        for t, row in enumerate(m):
            nz = np.flatnonzero(row)
            if nz.size > 2 or (nz.size == 2 and nz[1] != nz[0] + 1):
                raise ValueError("an interpolation row reads more than two adjacent source pixels")
            if nz.size:
                lo[t], hi[t] = nz[0], nz[-1]
                w0[t] = row[nz[0]]
                w1[t] = row[nz[1]] if nz.size == 2 else 0.0
        return lo, hi, w0, w1

    def part_tables(self, parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first native column each part reads, int64 [parts]; float32 [parts, K, width] the
        weights of the K native columns from there, zero where a column is not read; float64
        [parts] each part's largest weight sum, with a margin for rounding)."""
        if parts not in self._parts:
            if parts < 1 or self.width % parts:
                raise ValueError(f"{parts} parts do not divide a row of {self.width}")
            lo, hi, w0, w1 = self.cols
            width = self.width // parts
            first = np.array([lo[g * width : (g + 1) * width].min() for g in range(parts)], np.int64)
            reads = max(int(hi[g * width : (g + 1) * width].max() - first[g]) + 1 for g in range(parts))
            # A part must not read past the map's last column (its weights there are 0).
            first = np.minimum(first, max(0, self.source_width - reads))
            if reads > self.source_width:
                raise ValueError("a part reads more native columns than a row has")
            weights = np.zeros((parts, reads, width), np.float32)
            for s in range(self.width):
                g, j = divmod(s, width)
                weights[g, lo[s] - first[g], j] = w0[s]
                if hi[s] != lo[s]:
                    weights[g, hi[s] - first[g], j] = w1[s]
            # The largest weight sum of each part, raised for the rounding of two float32
            # products and a sum (relative 2**-22 at most) by 2**-20.
            scale = weights.astype(np.float64).sum(1).max(1) * (1.0 + 2.0**-20)
            self._parts[parts] = (first, weights, scale)
        return self._parts[parts]


def upsample_parts(
    native: torch.Tensor, kept: torch.Tensor, interp: Interpolation, mode: tuple[bool, bool]
) -> torch.Tensor:
    """Parts of rows of upsampled maps, computed from the native maps alone.

    The result is ``rows @ native @ cols.T`` (rows first) with each output value
    blended from its two nonzero weights per product (:class:`Interpolation`): equal
    to a dense product wherever the dense product rounds as the blend does, which
    ``mode`` says per product (fused multiply-adds, or products rounded then summed;
    the caller checks which one its matrix products match).

    Args:
        native: float32 [m, h, w], contiguous.
        kept: bool [m, T_h, parts], contiguous: the parts (of equal width) of each
            upsampled row wanted (``parts=1``: whole rows).
        interp: the interpolation.
        mode: (rows product with fused multiply-adds, columns product likewise).

    Returns:
        float32 [n, T_w / parts]: the kept parts in the order of ``kept.nonzero()``.
    """
    kernels = _compile()
    assert kernels is not None
    parts = kept.shape[2]
    first, weights, _ = interp.part_tables(parts)
    out = torch.empty((int(torch.count_nonzero(kept)), interp.width // parts), dtype=torch.float32)
    kernels["upsample"](_np(native), _np(kept), *interp.rows, first, weights, bool(mode[0]), bool(mode[1]), out.numpy())
    return out


class Parts:
    """How :func:`sketch_parts` and :func:`count_parts` make and bound the parts of upsampled rows.

    Args:
        interp: the interpolation.
        mode: the rounding of its blends (as for :func:`upsample_parts`).
        parts: the parts of a row (of equal width).
        cell_start: int64 [C + 1]: the target rows come in cells that read the same native
            rows, rows ``cell_start[c]`` to ``cell_start[c + 1]``.
        cell_scale: float64 [C]: at least the largest row weight sum of each cell times the
            largest column weight sum, with a margin for float64 rounding.
        slack: the upsampling's rounding allowance, a fraction of the largest |value| read.
    """

    def __init__(
        self,
        interp: Interpolation,
        mode: tuple[bool, bool],
        parts: int,
        cell_start: np.ndarray,
        cell_scale: np.ndarray,
        slack: float,
    ) -> None:
        self.interp = interp
        self.mode = (bool(mode[0]), bool(mode[1]))
        self.parts = int(parts)
        self.width = interp.width // self.parts
        self.cell_start = np.ascontiguousarray(cell_start, np.int64)
        self.cell_scale = np.ascontiguousarray(cell_scale, np.float64)
        self.slack = float(slack)


_NO_COUNTS = {  # the tallies' arguments when the loop stores parts instead
    "images": np.zeros(1, np.int64),
    "units": np.zeros(1, np.int64),
    "pixel": np.zeros((1, 1, 1), np.int32),
    "blocks": np.zeros(1, np.int64),
    "cells": np.zeros(1, np.int64),
    "block_act": np.zeros((1, 1, 1), np.int64),
    "block_inter": np.zeros((1, 1, 1), np.int64),
}


def _parts_call(
    native: torch.Tensor,
    level: torch.Tensor,
    sure: torch.Tensor,
    plan: Parts,
    out: np.ndarray,
    items: np.ndarray,
    zero_parts: np.ndarray,
    counting: dict[str, np.ndarray] | None,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    kernels = _compile()
    assert kernels is not None
    count = counting if counting is not None else _NO_COUNTS
    k, amb_m, amb_p, amb_v = kernels["parts"](
        _np(native),
        _np(level.to(torch.float32).contiguous()),
        _np(sure.to(torch.float32).contiguous()),
        *plan.interp.rows,
        plan.cell_start,
        plan.cell_scale,
        *plan.interp.part_tables(plan.parts),
        np.float64(plan.slack),
        counting is None,  # the sketch leaves exact zeros apart
        plan.mode[0],
        plan.mode[1],
        out,
        items,
        zero_parts,
        counting is not None,
        count["images"],
        count["units"],
        count["pixel"],
        count["blocks"],
        count["cells"],
        count["block_act"],
        count["block_inter"],
    )
    return int(k), amb_m, amb_p, amb_v


def sketch_parts(
    native: torch.Tensor, level: torch.Tensor, plan: Parts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parts of the upsampled rows of maps that may hold a value above their map's
    level, made from the native maps (values as :func:`upsample_parts`).

    Args:
        native: float32 [m, h, w], contiguous.
        level: float32 [m].
        plan: how the parts are made and bounded (:class:`Parts`).

    Returns:
        (float32 [n, T_w / parts] the parts; int64 [n] each one's index ``(i * T_h + t) *
        parts + part`` (map i, row t); int64 [m] per map, the parts of exact zeros, which
        are not among the first). Every part left out but the zeros lies wholly at or below
        its map's level.
    """
    most = native.shape[0] * plan.interp.height * plan.parts
    out = torch.empty((most, plan.width), dtype=torch.float32)
    items = torch.empty(most, dtype=torch.int64)
    zero_parts = torch.zeros(native.shape[0], dtype=torch.int64)
    k, *_ = _parts_call(native, level, level, plan, out.numpy(), items.numpy(), zero_parts.numpy(), None)
    return out[:k], items[:k], zero_parts


def count_parts(
    native: torch.Tensor,
    level: torch.Tensor,
    sure: torch.Tensor,
    plan: Parts,
    images: torch.Tensor,
    units: torch.Tensor,
    pixel: torch.Tensor,
    blocks: torch.Tensor,
    cells: torch.Tensor,
    block_act: torch.Tensor,
    block_inter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count the pixels of upsampled maps above their map's level, as :func:`count_rows`
    does, making only the parts of rows that may hold one (:func:`sketch_parts`) and
    storing none.

    Args:
        native: float32 [m, h, w], contiguous: map i is unit ``units[i]`` on batch image
            ``images[i]``.
        level: float32 [m]; sure: float32 [m] (-inf where every pixel above the level counts).
        plan: as for :func:`sketch_parts`.
        pixel, blocks, cells, block_act, block_inter: as for :func:`count_rows`.

    Returns:
        (map int64 [A], mask pixel int64 [A], value float32 [A]) of the pixels above the
        level but not ``sure``, which are not counted.
    """
    tallies = {
        "images": images,
        "units": units,
        "pixel": pixel,
        "blocks": blocks,
        "cells": cells,
        "block_act": block_act,
        "block_inter": block_inter,
    }
    _, amb_m, amb_p, amb_v = _parts_call(
        native,
        level,
        sure,
        plan,
        np.zeros((0, plan.width), np.float32),
        np.zeros(0, np.int64),
        np.zeros(native.shape[0], np.int64),
        {name: _np(t) for name, t in tallies.items()},
    )
    return torch.from_numpy(amb_m), torch.from_numpy(amb_p), torch.from_numpy(amb_v)


def contend(
    inter: np.ndarray,
    weights: np.ndarray,
    act: np.ndarray,
    con: np.ndarray,
    lab: np.ndarray,
    pair_unit: np.ndarray,
    pair_concept: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The label evidence's contenders in one pass per pair (see
    :func:`~dissect_core.evidence.label_evidence`): each (unit, concept) pair's IoU in every
    bootstrap resample, against the label's in that resample.

    Args:
        inter: float64 [p, m], each pair's intersections per block.
        weights: float64 [m, R], each block's count in each resample (integers).
        act: float64 [U, R], each unit's resampled on-pixels; con: float64 [C, R], each
            concept's resampled pixels; lab: float64 [U, R], the label's resampled IoU.
        pair_unit, pair_concept: int64 [p].

    Returns:
        ``above`` bool [U, R] (some pair of the unit beats the label), ``level`` int64 [U, R]
        (the unit's pairs equal to the label) and ``reach`` bool [p] (the pair reaches the
        label's IoU in some resample): exactly what the torch path computes, since every
        resampled sum is an exact integer and each IoU one division.
    """
    kernels = _compile()
    assert kernels is not None
    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (inter, weights, act, con, lab)]
    above = np.zeros(lab.shape, np.bool_)
    level = np.zeros(lab.shape, np.int64)
    reach = np.zeros(len(pair_unit), np.bool_)
    units, concepts = (np.ascontiguousarray(a, dtype=np.int64) for a in (pair_unit, pair_concept))
    kernels["contend"](*arrays, units, concepts, above, level, reach)
    return above, level, reach


def warm() -> bool:
    """Compile (or load from the cache) the loops for the CPU's usual types, now rather than
    in the first job: a worker calls this before its pool forks. A loop that fails to
    compile (a numba that does not match this numpy, say) turns the loops off in this
    process, with a warning: the torch path stands in.

    Returns:
        Whether the fused loops are available.
    """
    global _kernels, _import_error
    if not available(torch.zeros(0)):
        return False
    try:
        _warm_calls()
    except Exception as exc:  # any compiler failure: fall back, and say why
        _kernels, _import_error = None, f"{type(exc).__name__}: {exc}"
        warnings.warn(f"dissect_core.fused: the fused loops are off ({_import_error})", RuntimeWarning, stacklevel=2)
        return False
    return True


def _warm_calls() -> None:
    one_pair = np.zeros(1, np.int64)
    contend(np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1)), one_pair, one_pair)
    interp = Interpolation(torch.ones((2, 1)) * 0.5, torch.ones((2, 1)))
    native = torch.zeros((1, 1, 1))
    level = torch.zeros(1)
    one = torch.zeros(1, dtype=torch.int64)
    pixel = torch.zeros((1, 4, 1), dtype=torch.int32)
    for mode in ((False, False), (False, True), (True, False), (True, True)):
        upsample_parts(native, torch.ones((1, 2, 1), dtype=torch.bool), interp, mode)
        plan = Parts(interp, mode, 1, np.array([0, 2]), np.ones(1), 2.0**-21)
        sketch_parts(native, level, plan)
        for inter in (torch.int32, torch.int64):
            count_parts(
                native,
                level,
                level,
                plan,
                one,
                one,
                pixel,
                one,
                torch.zeros(4, dtype=torch.int64),
                torch.zeros((1, 1, 1), dtype=torch.int64),
                torch.zeros((1, 1, 1), dtype=inter),
            )
    pixel = torch.zeros((1, 2, 1), dtype=torch.int32)
    rows = torch.zeros((1, 2), dtype=torch.float32)
    floor = torch.zeros(1, dtype=torch.float32)
    floored_stats(rows, one, floor, 15, one.clone(), one.clone())
    counts = torch.zeros((1, 1), dtype=torch.int64)
    floored_bucket(rows, one, floor, 15, (one, counts), (one, counts), one.clone(), one.clone())
    for inter in (torch.int32, torch.int64):
        count_rows(
            rows,
            one,
            one,
            one,
            floor,
            floor,
            pixel,
            one,
            torch.zeros(2, dtype=torch.int64),
            torch.zeros((1, 1, 1), dtype=torch.int64),
            torch.zeros((1, 1, 1), dtype=inter),
        )

"""Per-unit streaming quantiles: a mergeable sketch plus an exact refinement.

The dissection threshold of a unit is numpy's ``method="hazen"`` quantile of its
upsampled activations over every pixel of every image. That is computed in two
steps, both streaming, vectorised over units and mergeable across shards:

1. :class:`QuantileSketch`, a DDSketch-style histogram per unit. Every float32
   value is put in a bucket by its bit pattern: sign, exponent and the top
   ``mantissa_bits`` (m) bits of the mantissa. A bucket spans a relative width of
   at most ``2**-m``, so reading a rank off the histogram (bucket midpoint) has a
   relative value error of at most ``alpha = 2**-(m+1)`` (m = 8: alpha ~ 0.002)
   for normal floats; exact zeros have a bucket of their own, negatives a mirrored
   store. Memory is bounded: each store keeps ``max_buckets`` buckets per unit
   below the largest magnitude seen and collapses smaller magnitudes into its
   lowest bucket (only low quantiles lose accuracy; the window moves in steps of
   ``max_buckets // 4``, so it always spans at least 3/4 of that below the
   largest bucket). Updates are one ``bincount``
   over ``unit * width + bucket``, with no sort. Shards merge exactly: the window
   depends only on the largest value seen, and histograms add.
2. :class:`QuantileRefiner`, the exact refinement. The sketch's :meth:`bracket`
   names, per unit, the range of keys holding the two order statistics that the
   hazen rule interpolates, and how many values lie below it. A second pass over
   the same data collects the values inside that range (or, where a range is too
   crowded for the memory budget, histograms it again at a finer resolution) and
   returns the exact order statistics, so the quantile equals
   ``np.quantile(values.astype(np.float64), q, method="hazen")`` bit for bit.

Values are compared through an order-preserving int32 key of their float32 bits
(:func:`float_keys`), so brackets are exact integer ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict, Unpack

import numpy as np
import torch

from dissect_core import fused

__all__ = [
    "QuantileBracket",
    "QuantileRefiner",
    "QuantileSketch",
    "exact_quantiles",
    "float_keys",
    "hazen_lerp",
    "hazen_ranks",
    "keys_to_float",
]

_ABS_MASK = 0x7FFFFFFF
_SPARSE_BELOW = 1 / 8
_FEW_LOW = 1 / 8  # rows of units with a floor below 0 that are added value by value (_add_floored)
_FAST_RAISE = True
_INF_KEY = 0x7F800000


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving integer keys of float32 values.

    Args:
        x: float tensor of any shape (converted to float32); must not hold NaN.

    Returns:
        int32 tensor of x's shape with ``key(a) < key(b)`` iff ``a < b``
        (-0.0 and +0.0 share key 0).
    """
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return torch.where(bits < 0, -(bits & _ABS_MASK), bits)


def keys_to_float(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys`.

    Args:
        keys: integer array of keys (any shape); magnitudes are clipped to +-inf.

    Returns:
        float32 array of the same shape.
    """
    k = np.asarray(keys, dtype=np.int64)
    mag = np.minimum(np.abs(k), _INF_KEY)
    bits = np.where(k < 0, mag | 0x80000000, mag).astype(np.uint32)
    return bits.view(np.float32)


def _keys_to_float32(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_keys` for int keys in the int32 range, in torch."""
    k = keys.to(torch.int64)
    bits = torch.where(k < 0, (-k) | -0x80000000, k).to(torch.int32)
    return bits.view(torch.float32)


def hazen_ranks(n: int, q: float) -> tuple[int, int, float]:
    """The two order statistics and the weight numpy's hazen quantile interpolates.

    Args:
        n: number of values (> 0).
        q: quantile in [0, 1].

    Returns:
        (lo, hi, gamma): 0-based ranks and the weight such that the quantile is
        ``hazen_lerp(sorted[lo], sorted[hi], gamma)``, exactly as numpy computes it.
    """
    if n <= 0:
        raise ValueError("quantile of an empty set of values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {q}")
    virtual = n * q + (0.5 + q * (1 - 0.5 - 0.5)) - 1
    prev = float(math.floor(virtual))
    lo, hi = int(prev), int(prev) + 1
    if virtual >= n - 1:
        lo, hi, prev = n - 1, n - 1, -1.0
    if virtual < 0:
        lo, hi, prev = 0, 0, 0.0
    return lo, hi, float(np.float64(virtual) - np.float64(prev))


def hazen_lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's quantile interpolation between two order statistics, in float64.

    Args:
        a: array [U] of the lower order statistics.
        b: array [U] of the upper order statistics.
        gamma: weight from :func:`hazen_ranks`.

    Returns:
        float64 array [U].
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1 - gamma)
    return a + diff * gamma


def _as_units_last(x: torch.Tensor, batched: bool) -> torch.Tensor:
    if batched:
        if x.dim() < 2:
            raise ValueError(f"expected [B, U, ...], got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], x.shape[1], -1)
    if x.dim() != 2:
        raise ValueError(f"expected [U, N], got shape {tuple(x.shape)}")
    return x.unsqueeze(0)


def _rebase(counts: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Shift each row down by delta[u] >= 0 columns, collapsing into column 0."""
    width = counts.shape[1]
    cols = torch.arange(width, device=counts.device)
    src = cols[None, :] + delta[:, None]
    moved = torch.gather(counts, 1, src.clamp(max=width - 1)) * (src < width)
    csum = torch.cumsum(counts, dim=1)
    moved[:, 0] = torch.gather(csum, 1, delta.clamp(max=width - 1)[:, None])[:, 0]
    return moved


class QuantileSketch:
    """Mergeable per-unit histogram sketch of float32 values (see module docstring).

    Args:
        units: number of units U.
        mantissa_bits: m, mantissa bits kept per bucket (relative error 2**-(m+1)).
        max_buckets: W, buckets kept per sign and unit.
        floor: optional float [U]; values <= floor[u] are only counted (in one
            lowest bucket per unit), not histogrammed. When the quantile of
            interest lies well above the floor this skips most of the work; if it
            does not, the bracket covers the floor bucket and refinement still
            finds the exact value. Sketches merge only with equal floors. A
            floor of -inf counts nothing; :meth:`raise_floor` raises floors as
            data comes in, and :meth:`add_rows` skips whole rows below them.
        device: where the histograms live (default: the device of the first data).
    """

    def __init__(
        self,
        units: int,
        *,
        mantissa_bits: int = 8,
        max_buckets: int = 4096,
        floor: torch.Tensor | np.ndarray | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0 <= mantissa_bits <= 23:
            raise ValueError("mantissa_bits must lie in [0, 23]")
        if max_buckets < 2:
            raise ValueError("max_buckets must be at least 2")
        self.units = int(units)
        self.mantissa_bits = int(mantissa_bits)
        self.max_buckets = int(max_buckets)
        self.shift = 23 - self.mantissa_bits
        self.n = 0
        self.device = torch.device(device) if device is not None else None
        self.floor: torch.Tensor | None = None
        if floor is not None:
            self.floor = torch.as_tensor(np.asarray(torch.as_tensor(floor).cpu(), dtype=np.float32), device=self.device)
            if self.floor.shape != (self.units,):
                raise ValueError(f"floor must have shape ({self.units},), got {tuple(self.floor.shape)}")
        self.zeros: torch.Tensor | None = None
        self.floor_count: torch.Tensor | None = None
        self.key_min: torch.Tensor | None = None
        self.key_max: torch.Tensor | None = None
        self.stores: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def finite(self) -> bool:
        """False when any value added was infinite or NaN."""
        if self.key_max is None or self.key_min is None:
            return True
        return bool((self.key_max < _INF_KEY).all()) and bool((self.key_min > -_INF_KEY).all())

    @property
    def alpha(self) -> float:
        """Relative value error bound of :meth:`quantile` for normal floats."""
        return 2.0 ** -(self.mantissa_bits + 1)

    def _init(self, device: torch.device) -> None:
        if self.device is None:
            self.device = device
        if self.zeros is None:
            self.zeros = torch.zeros(self.units, dtype=torch.int64, device=self.device)
            self.floor_count = torch.zeros(self.units, dtype=torch.int64, device=self.device)
            self.key_min = torch.full((self.units,), 1 << 40, dtype=torch.int64, device=self.device)
            self.key_max = torch.full((self.units,), -(1 << 40), dtype=torch.int64, device=self.device)
        if self.floor is not None:
            self.floor = self.floor.to(self.device)

    def _store(self, sign: str) -> dict[str, torch.Tensor]:
        if sign not in self.stores:
            self.stores[sign] = {
                "counts": torch.zeros(self.units, self.max_buckets, dtype=torch.int64, device=self.device),
                "offset": torch.zeros(self.units, dtype=torch.int64, device=self.device),
                "max": torch.full((self.units,), -1, dtype=torch.int64, device=self.device),
            }
        return self.stores[sign]

    def _raise_max(self, sign: str, new_max: torch.Tensor) -> None:
        store = self._store(sign)
        top = torch.maximum(store["max"], new_max.to(torch.int64))
        grain = max(1, self.max_buckets // 4)
        offset = -torch.div(-(top - self.max_buckets + 1).clamp(min=0), grain, rounding_mode="floor") * grain
        delta = offset - store["offset"]
        moved = delta != 0
        if bool(moved.any()):
            rows = moved.nonzero().squeeze(1)
            if rows.numel() == self.units:
                store["counts"] = _rebase(store["counts"], delta)
            else:  # only the units whose window moved
                counts = store["counts"]
                counts.index_copy_(0, rows, _rebase(counts.index_select(0, rows), delta.index_select(0, rows)))
        store["offset"] = offset
        store["max"] = top

    def add(self, x: torch.Tensor) -> None:
        """Add values.

        Args:
            x: float tensor [U, N]: N values for each unit (no NaN).
        """
        self._add(_as_units_last(x, batched=False))

    def add_batch(self, x: torch.Tensor) -> None:
        """Add feature maps.

        Args:
            x: float tensor [B, U, ...]: every element of x[:, u] is a value of unit u.
        """
        self._add(_as_units_last(x, batched=True))

    def _add(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.units:
            raise ValueError(f"sketch has {self.units} units, data has {x.shape[1]}")
        if x.numel() == 0:
            return
        self._init(x.device)
        x = x.to(device=self.device, dtype=torch.float32).contiguous()
        assert self.key_min is not None and self.key_max is not None and self.zeros is not None
        if self.floor is not None and not bool(torch.isneginf(self.floor).all()):
            low = x.amin(dim=(0, 2))
            self._extremes(float_keys(low), float_keys(x.amax(dim=(0, 2))))
            units = torch.arange(self.units, device=self.device).repeat(x.shape[0])
            self._add_floored(x.reshape(-1, x.shape[2]), units, nonneg=bool((low >= 0).all()))
            self.n += x.shape[0] * x.shape[2]
            return
        bits = x.view(torch.int32)
        w = self.max_buckets
        s = self.shift
        bits_min = bits.amin(dim=(0, 2))
        has_neg = bool((bits_min < 0).any())
        unit = torch.arange(self.units, device=self.device, dtype=torch.int64)
        if not has_neg:
            bits_max = bits.amax(dim=(0, 2))
            self._extremes(bits_min, bits_max)
            self._raise_max("pos", bits_max >> s)
            pos = self.stores["pos"]
            idx = bits >> s
            idx += (1 - pos["offset"]).to(torch.int32)[None, :, None]
            torch.maximum(idx, torch.ones((), dtype=torch.int32, device=self.device), out=idx)
            idx.mul_(bits.clamp(max=1))
            idx += (unit * (w + 1)).to(torch.int32)[None, :, None]
            hist = torch.bincount(idx.view(-1), minlength=self.units * (w + 1)).view(self.units, w + 1)
            self.zeros += hist[:, 0]
            pos["counts"] += hist[:, 1:]
        else:
            key = torch.where(bits < 0, -(bits & _ABS_MASK), bits)
            mag = (bits & _ABS_MASK) >> s
            kmin = key.amin(dim=(0, 2))
            kmax = key.amax(dim=(0, 2))
            self._extremes(kmin, kmax)
            self._raise_max("pos", torch.where(kmax > 0, kmax >> s, -1))
            self._raise_max("neg", torch.where(kmin < 0, (-kmin) >> s, -1))
            pos, neg = self.stores["pos"], self.stores["neg"]
            base = (unit * (2 * w + 1)).to(torch.int32)[None, :, None]
            pos_col = base + (w + 1) + (mag - pos["offset"].to(torch.int32)[None, :, None]).clamp(min=0)
            neg_col = base + (w - 1) - (mag - neg["offset"].to(torch.int32)[None, :, None]).clamp(min=0)
            idx = torch.where(key > 0, pos_col, torch.where(key < 0, neg_col, base + w))
            hist = torch.bincount(idx.view(-1), minlength=self.units * (2 * w + 1)).view(self.units, 2 * w + 1)
            self.zeros += hist[:, w]
            pos["counts"] += hist[:, w + 1 :]
            neg["counts"] += hist[:, :w].flip(1)
        self.n += x.shape[0] * x.shape[2]

    def add_rows(
        self,
        rows: torch.Tensor,
        units: torch.Tensor,
        *,
        total: int,
        lower: torch.Tensor,
        upper: torch.Tensor,
        zeros: torch.Tensor | None = None,
    ) -> None:
        """Add values of which only those above the floor are given (a sketch with a floor).

        For feature maps of which most lie wholly at or below the floor: the
        caller passes the maps (or map rows) that may rise above it, and the rest
        are only counted.

        Args:
            rows: float tensor [M, P] of values (e.g. upsampled maps, or rows of them).
            units: int64 tensor [M], the unit of each row.
            total: values added per unit by this call, given or not; every value
                not in ``rows`` must lie at or below its unit's floor.
            lower: float32 [U], at most every value added (given or not).
            upper: float32 [U], at least every value added (given or not).
            zeros: optional int64 [U], values not in ``rows`` that are exact zeros
                (e.g. whole maps of a post-ReLU unit that never fired), counted
                without being given.
        """
        if self.floor is None:
            raise ValueError("add_rows needs a sketch with a floor")
        if rows.dim() != 2 or units.shape != rows.shape[:1]:
            raise ValueError(f"rows must be [M, P] with units [M], got {tuple(rows.shape)} and {tuple(units.shape)}")
        self._init(rows.device if rows.numel() else lower.device)
        assert self.floor_count is not None and self.floor is not None and self.zeros is not None
        self._extremes(float_keys(lower.to(self.device)), float_keys(upper.to(self.device)))
        rows = rows.to(device=self.device, dtype=torch.float32).contiguous()
        units = units.to(self.device)
        self.floor_count += total - torch.bincount(units, minlength=self.units) * rows.shape[1]
        if zeros is not None:
            zeros = zeros.to(self.device, torch.int64)
            above = zeros * (self.floor < 0)
            self.floor_count -= above
            self.zeros += above
        if rows.numel():
            self._add_floored(rows, units, nonneg=bool((lower >= 0).all()))
        self.n += int(total)

    def _add_floored(self, rows: torch.Tensor, units: torch.Tensor, nonneg: bool = False) -> None:
        """Histogram rows of values [M, P] (float32, contiguous) of units [M] against the floor:
        values at or below it go to the floor count. A sparse path when few values lie above
        the floor, else one dense ``bincount`` over the value-ordered layout of :meth:`_ordered_counts`.
        ``nonneg``: no value is below 0 (then the zeros take one comparison less)."""
        assert self.floor is not None and self.floor_count is not None and self.zeros is not None
        if fused.available(rows):
            self._add_floored_fused(rows, units)
            return
        p = rows.shape[1]
        floor = self.floor.index_select(0, units)[:, None]
        # Exact zeros above the floor (post-ReLU units whose floor is still below 0) are
        # only counted: they need no bucket, and they are most values of such units.
        if nonneg:
            # Every value is >= 0: those not above max(floor, 0) are at or below the floor,
            # or exact zeros above it (a floor below 0), which is all the rest of such a row.
            above = rows > floor.clamp(min=0)
            if bool((self.floor < 0).any()):
                rest = (p - torch.count_nonzero(above, dim=1)) * (floor[:, 0] < 0)
                zero_counts = torch.zeros(self.units, dtype=torch.int64, device=self.device).index_add_(0, units, rest)
                self.zeros += zero_counts
                self.floor_count -= zero_counts
        else:
            above = rows > floor
            if bool((self.floor < 0).any()):
                zero = rows == 0
                above.logical_and_(~zero)
                zero.logical_and_(floor < 0)
                zero_counts = torch.zeros(self.units, dtype=torch.int64, device=self.device).index_add_(
                    0, units, torch.count_nonzero(zero, dim=1)
                )
                del zero
                self.zeros += zero_counts
                self.floor_count -= zero_counts
        if int(torch.count_nonzero(above)) <= rows.numel() * _SPARSE_BELOW:
            flat = above.view(-1).nonzero().squeeze(1)
            del above
            picked = units.index_select(0, flat // p)
            self.floor_count += torch.bincount(units, minlength=self.units) * p - torch.bincount(
                picked, minlength=self.units
            )
            self._add_pairs(picked, rows.view(-1).index_select(0, flat))
            return
        w, sh = self.max_buckets, self.shift
        width = 2 * w + 2
        neg_top = torch.full((self.units,), -1, dtype=torch.int64, device=self.device)
        pos_top = torch.full((self.units,), -1, dtype=torch.int64, device=self.device)
        row_max = rows.amax(1)
        top = torch.where((row_max > floor[:, 0]) & (row_max > 0), float_keys(row_max).to(torch.int64) >> sh, -1)
        pos_top.scatter_reduce_(0, units, top, reduce="amax")
        maybe_neg = None if nonneg else (floor[:, 0] < 0) & (rows.amin(1) < 0)
        if maybe_neg is not None and bool(maybe_neg.any()):
            low = torch.where(above[maybe_neg], rows[maybe_neg], torch.inf).amin(1)
            low_top = torch.where(low < 0, (-float_keys(low).to(torch.int64)) >> sh, -1)
            neg_top.scatter_reduce_(0, units[maybe_neg], low_top, reduce="amax")
        for sign, sign_top in (("pos", pos_top), ("neg", neg_top)):
            if bool((sign_top >= 0).any()) or sign in self.stores:
                self._raise_max(sign, sign_top)
        bits = rows.view(torch.int32)
        if nonneg:  # only -0.0 has the sign bit, and it is not above any floor >= 0 here
            idx = bits >> sh
        else:
            idx = bits & _ABS_MASK
            idx >>= sh
        low = floor[:, 0] < 0  # rows of units whose floor lies below 0
        n_low = int(torch.count_nonzero(low))
        few_low = 0 < n_low <= low.numel() * _FEW_LOW
        if "pos" in self.stores and ("neg" not in self.stores or nonneg or n_low == 0 or few_low):
            # Positive values only: one column for the floor, then the positive store's
            # columns from c0 up (below c0 no value above a floor can land, _pos_low_col).
            # The rows of a few units with a floor below 0 (values of any sign above it,
            # in any bucket) go value by value instead, so that c0 is that of the others.
            pos = self.stores["pos"]
            if few_low:
                pick = low.nonzero().squeeze(1)
                flat = above.index_select(0, pick).view(-1).nonzero().squeeze(1)
                picked = units.index_select(0, pick).index_select(0, flat // p)
                above.index_fill_(0, pick, False)  # so the histogram counts them at the floor
                self.floor_count -= torch.bincount(picked, minlength=self.units)
                self._add_pairs(picked, rows.index_select(0, pick).view(-1).index_select(0, flat))
            c0 = self._pos_low_col(floors_at_or_above_zero=few_low)
            width = w - c0 + 1
            # Column in the flat [U, width] histogram: u * width + clamp(bucket - offset - c0
            # + 1, 1) above the floor, u * width (the floor column) at or below it.
            row_base = (units * width).to(torch.int32)[:, None]
            idx -= (pos["offset"] + (c0 - 1)).to(torch.int32).index_select(0, units)[:, None] - row_base
            torch.maximum(idx, row_base + 1, out=idx)
            torch.where(above, idx, row_base, out=idx)
            del above
            hist = torch.bincount(idx.view(-1), minlength=self.units * width).view(self.units, width)
            del idx
            self.floor_count += hist[:, 0]
            pos["counts"][:, c0:] += hist[:, 1:]
            return
        if "neg" in self.stores:
            neg_col = idx - self.stores["neg"]["offset"].to(torch.int32)[units][:, None]
            neg_col.clamp_(min=0).neg_().add_(w)
        if "pos" in self.stores:
            idx -= self.stores["pos"]["offset"].to(torch.int32)[units][:, None]
            idx.clamp_(min=0).add_(w + 2)
        if "neg" in self.stores:
            torch.where(bits < 0, neg_col, idx, out=idx)
            del neg_col
        idx.masked_fill_(~above, 0)  # at or below the floor, or an exact zero (counted above)
        del above
        idx += (units.to(torch.int32) * width)[:, None]
        hist = torch.bincount(idx.view(-1), minlength=self.units * width).view(self.units, width)
        del idx
        self.floor_count += hist[:, 0]
        if "neg" in self.stores:
            self.stores["neg"]["counts"] += hist[:, 1 : w + 1].flip(1)
        if "pos" in self.stores:
            self.stores["pos"]["counts"] += hist[:, w + 2 :]

    def raise_floor(self, rank: int) -> None:
        """Raise each unit's floor to just below the bucket that holds the value of 0-based
        ascending rank ``rank`` among the values added so far, folding the buckets below
        into the floor count (never lowers a floor; a sketch with a floor).

        A value of that rank is at most any later value of a rank at least as far from
        the top (``n - rank`` values from it), so raising the floor this way while data
        streams in keeps such order statistics above the floor.

        Args:
            rank: 0-based rank in [0, n).
        """
        if self.floor is None:
            raise ValueError("raise_floor needs a sketch with a floor")
        if self.zeros is None or not 0 <= rank < self.n:
            return
        assert self.floor_count is not None and self.key_min is not None
        w, s, dev = self.max_buckets, self.shift, self.zeros.device
        floor_key = float_keys(self.floor).to(torch.int64)
        neg = self.stores.get("neg")
        pos = self.stores.get("pos")
        below_pos = self.floor_count + self.zeros + (neg["counts"].sum(1) if neg is not None else 0)
        # The units whose rank lies below the positive store, or whose floor lies below 0
        # (positive counts in any column), take the general path over every column; the
        # others search the positive store's columns from c0 up (_pos_low_col) only.
        special = (below_pos > rank) | (floor_key < 0)
        c0_all = self._pos_low_col() if pos is not None else 0  # for every unit
        if pos is not None and _FAST_RAISE and not bool(special.all()):
            c0 = self._pos_low_col(floors_at_or_above_zero=True)
            # Columns as in _ordered_counts: 0 the floor bucket, w + 1 the zeros, w + 2 + i pos bucket i.
            csum = torch.cumsum(pos["counts"][:, c0:], dim=1)
            i = torch.searchsorted(csum, (rank - below_pos).clamp(min=0)[:, None], right=True)[:, 0]
            i = i.clamp(max=w - 1 - c0) + c0
            col = i + (w + 2)
            key_lo = torch.where(i > 0, (pos["offset"] + i) << s, torch.ones_like(i)).clamp(min=1)
            folded = below_pos + torch.where(i > c0, torch.gather(csum, 1, (i - 1 - c0).clamp(min=0)[:, None])[:, 0], 0)
            if bool(special.any()):
                sub = special.nonzero().squeeze(1)
                sub_col, sub_key_lo, sub_folded = self._raise_columns(rank, sub)
                col = col.index_copy(0, sub, sub_col)
                key_lo = key_lo.index_copy(0, sub, sub_key_lo)
                folded = folded.index_copy(0, sub, sub_folded)
        else:
            col, key_lo, folded = self._raise_columns(rank, None)
        key_lo = torch.maximum(torch.maximum(key_lo, self.key_min), floor_key + 1)
        raise_it = (col > 0) & (key_lo - 1 > floor_key)
        if not bool(raise_it.any()):
            return
        col = torch.where(raise_it, col, torch.zeros_like(col))
        cols = torch.arange(w, device=dev)[None, :]
        self.floor_count = torch.where(raise_it, folded, self.floor_count)
        if neg is not None:
            neg["counts"].masked_fill_(cols > (w - col)[:, None], 0)
        self.zeros = self.zeros.masked_fill(col > w + 1, 0)
        if pos is not None:
            pos["counts"][:, c0_all:].masked_fill_(cols[:, c0_all:] < (col - w - 2)[:, None], 0)
        self.floor = torch.where(raise_it, _keys_to_float32(key_lo - 1), self.floor)

    def _raise_columns(self, rank: int, sub: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For :meth:`raise_floor`, over every column of :meth:`_ordered_counts` of the units
        ``sub`` (int64 [S]; None: all): the column holding ascending rank ``rank``, the lowest
        key of its bucket, and the count of the columns below it."""
        w, s = self.max_buckets, self.shift
        counts = self._ordered_counts(sub)
        csum = torch.cumsum(counts, dim=1)
        target = torch.full((counts.shape[0], 1), int(rank), dtype=torch.int64, device=counts.device)
        col = torch.searchsorted(csum, target, right=True)[:, 0].clamp(max=csum.shape[1] - 1)
        m = (w - col).clamp(0, w - 1)

        def offset(sign: str) -> torch.Tensor:
            if sign not in self.stores:
                return torch.zeros_like(col)
            return self.stores[sign]["offset"] if sub is None else self.stores[sign]["offset"].index_select(0, sub)

        neg_lo = -(((offset("neg") + m + 1) << s) - 1)
        i = (col - (w + 2)).clamp(min=0)
        pos_lo = torch.where(i > 0, (offset("pos") + i) << s, torch.ones_like(i)).clamp(min=1)
        key_lo = torch.where(col <= w, neg_lo, torch.where(col == w + 1, torch.zeros_like(col), pos_lo))
        folded = torch.gather(csum, 1, (col - 1).clamp(min=0)[:, None])[:, 0]
        return col, key_lo, folded

    def _add_floored_fused(self, rows: torch.Tensor, units: torch.Tensor) -> None:
        """:meth:`_add_floored` in two fused CPU loops (:mod:`dissect_core.fused`): the tops
        per sign, the stores' windows raised to them, then every value to its bucket. The
        counts, zeros, floor counts and windows are those of the torch path (a histogram
        whose window only rises does not depend on when each value came)."""
        assert self.floor is not None and self.floor_count is not None and self.zeros is not None
        units = units.contiguous()
        floor = self.floor.contiguous()
        tops = {sign: torch.full((self.units,), -1, dtype=torch.int64) for sign in ("pos", "neg")}
        above = fused.floored_stats(rows, units, floor, self.shift, tops["pos"], tops["neg"])
        for sign, top in tops.items():
            if sign in self.stores or bool((top >= 0).any()):
                self._raise_max(sign, top)
        if not above:
            self.floor_count += torch.bincount(units, minlength=self.units) * rows.shape[1]
            return
        none = torch.zeros((1, 1), dtype=torch.int64)
        parts = []
        for sign in ("pos", "neg"):
            if sign in self.stores:
                store = self.stores[sign]
                store["counts"] = store["counts"].contiguous()
                parts.append((store["offset"], store["counts"]))
            else:
                parts.append((none[0], none))
        fused.floored_bucket(rows, units, floor, self.shift, parts[0], parts[1], self.zeros, self.floor_count)

    def _pos_low_col(self, floors_at_or_above_zero: bool = False) -> int:
        """A column of the positive store below which every unit's counts are 0.

        A value above a floor >= 0 falls in the floor's bucket or a higher one, and
        :meth:`raise_floor` empties the buckets below a raised floor; a unit with a
        floor below 0 may have counts anywhere (then 0). Dense updates and floor
        raises touch only the columns from here up. ``floors_at_or_above_zero``:
        the column for the units whose floor is >= 0 only (the others left out).
        """
        assert self.floor is not None
        pos = self.stores["pos"]
        key = float_keys(self.floor).to(torch.int64)
        col = (key >> self.shift) - pos["offset"]
        if floors_at_or_above_zero:
            col = col[key >= 0]
            return max(0, int(col.min())) if col.numel() else 0
        return max(0, int(torch.where(key >= 0, col, torch.zeros_like(key)).min()))

    def _extremes(self, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
        assert self.key_min is not None and self.key_max is not None
        self.key_min = torch.minimum(self.key_min, kmin.to(torch.int64))
        self.key_max = torch.maximum(self.key_max, kmax.to(torch.int64))

    def _add_pairs(self, units: torch.Tensor, values: torch.Tensor) -> None:
        """Histogram values given with their units (int64 [M], float32 [M])."""
        assert self.zeros is not None
        key = float_keys(values)
        positive = key > 0
        if bool(positive.all()):
            parts = [("pos", units, key)]
        else:
            zero = key == 0
            self.zeros += torch.bincount(units[zero], minlength=self.units)
            negative = ~(positive | zero)
            parts = [("pos", units[positive], key[positive]), ("neg", units[negative], -key[negative])]
        w = self.max_buckets
        for sign, uu, mag in parts:
            if uu.numel() == 0 and sign not in self.stores:
                continue
            bucket = (mag >> self.shift).to(torch.int64)
            top = torch.full((self.units,), -1, dtype=torch.int64, device=self.device)
            top.scatter_reduce_(0, uu, bucket, reduce="amax")
            self._raise_max(sign, top)
            store = self.stores[sign]
            col = (bucket - store["offset"][uu]).clamp(min=0)
            store["counts"] = store["counts"].contiguous()
            flat = uu * w + col
            # index_add_ beats a bincount over all U * W buckets plus the add, at every size measured
            store["counts"].view(-1).index_add_(0, flat, torch.ones_like(flat))

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Add another sketch's data into this one (in place).

        Args:
            other: a sketch with the same units, mantissa_bits and max_buckets.

        Returns:
            self.
        """
        if (other.units, other.mantissa_bits, other.max_buckets) != (self.units, self.mantissa_bits, self.max_buckets):
            raise ValueError("cannot merge sketches with different shapes or resolutions")
        if (self.floor is None) != (other.floor is None) or (
            self.floor is not None and other.floor is not None and not torch.equal(self.floor.cpu(), other.floor.cpu())
        ):
            raise ValueError("cannot merge sketches with different floors")
        if other.zeros is None:
            return self
        self._init(other.zeros.device)
        assert self.zeros is not None and self.floor_count is not None
        assert self.key_min is not None and self.key_max is not None
        assert other.floor_count is not None and other.key_min is not None and other.key_max is not None
        self.zeros += other.zeros.to(self.device)
        self.floor_count += other.floor_count.to(self.device)
        self.key_min = torch.minimum(self.key_min, other.key_min.to(self.device))
        self.key_max = torch.maximum(self.key_max, other.key_max.to(self.device))
        for sign, ostore in other.stores.items():
            self._raise_max(sign, ostore["max"].to(self.device))
            store = self.stores[sign]
            ocounts = ostore["counts"].to(self.device)
            delta = store["offset"] - ostore["offset"].to(self.device)
            store["counts"] += _rebase(ocounts, delta) if bool((delta != 0).any()) else ocounts
        self.n += other.n
        return self

    def _ordered_counts(self, sub: torch.Tensor | None = None) -> torch.Tensor:
        """Value-ordered counts [U, L] (or [S, L] of the units ``sub``, int64 [S]): the floor
        bucket (with a floor), the negative buckets from the most negative up, the zeros,
        then the positive buckets (:meth:`_column_keys` gives each column's key range)."""
        w = self.max_buckets
        assert self.zeros is not None

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if sub is None else t.index_select(0, sub)

        parts = []
        if self.floor is not None:
            assert self.floor_count is not None
            parts.append(rows(self.floor_count)[:, None])
        n = self.units if sub is None else sub.numel()
        empty = torch.zeros(n, w, dtype=torch.int64, device=self.device)
        parts.append(rows(self.stores["neg"]["counts"]).flip(1) if "neg" in self.stores else empty)
        parts.append(rows(self.zeros)[:, None])
        parts.append(rows(self.stores["pos"]["counts"]) if "pos" in self.stores else empty)
        return torch.cat(parts, 1)

    def _column_keys(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inclusive key range [lo, hi] of columns ``col`` (int64 [U, R]) of
        :meth:`_ordered_counts`, clipped to the keys seen and kept above the floor."""
        w, s = self.max_buckets, self.shift
        assert self.key_min is not None and self.key_max is not None
        key_min, key_max = self.key_min[:, None], self.key_max[:, None]
        base = 1 if self.floor is not None else 0

        def mag_range(store: dict[str, torch.Tensor], i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            bucket = store["offset"][:, None] + i
            lo = torch.where(i == 0, torch.ones_like(bucket), (bucket << s).clamp(min=1))
            return lo, ((bucket + 1) << s) - 1

        m = (w - 1 - (col - base)).clamp(0, w - 1)  # negative bucket, flipped
        if "neg" in self.stores:
            mag_lo, mag_hi = mag_range(self.stores["neg"], m)
            neg_lo, neg_hi = -mag_hi, -mag_lo
        else:
            neg_lo = neg_hi = torch.full_like(col, -1)
        i = (col - (base + w + 1)).clamp(0, w - 1)
        if "pos" in self.stores:
            pos_lo, pos_hi = mag_range(self.stores["pos"], i)
        else:
            pos_lo = pos_hi = torch.ones_like(col)
        zero = torch.zeros_like(col)
        lo = torch.where(col < base + w, neg_lo, torch.where(col == base + w, zero, pos_lo))
        hi = torch.where(col < base + w, neg_hi, torch.where(col == base + w, zero, pos_hi))
        if self.floor is not None:
            floor_key = float_keys(self.floor).to(torch.int64)[:, None]
            lo = torch.where(col < base, key_min, torch.maximum(lo, floor_key + 1))
            hi = torch.where(col < base, floor_key, hi)
        return torch.maximum(lo, key_min), torch.minimum(hi, key_max)

    def bracket(self, q: float) -> QuantileBracket:
        """The key ranges that hold the order statistics of the q-quantile.

        Args:
            q: quantile in [0, 1].

        Returns:
            a :class:`QuantileBracket` for :class:`QuantileRefiner` (already
            resolved for units whose statistics fall in a single-value bucket,
            such as exact zeros).
        """
        if self.n == 0 or self.zeros is None:
            raise ValueError("quantile of an empty sketch")
        lo_rank, hi_rank, gamma = hazen_ranks(self.n, q)
        counts = self._ordered_counts()
        csum = torch.cumsum(counts, dim=1)
        ranks = torch.tensor([lo_rank, hi_rank], dtype=torch.int64, device=csum.device)
        col = torch.searchsorted(csum, ranks[None, :].expand(self.units, 2).contiguous(), right=True)
        col = col.clamp(max=csum.shape[1] - 1)
        below = torch.where(col > 0, torch.gather(csum, 1, (col - 1).clamp(min=0)), torch.zeros_like(col))
        inside = torch.gather(counts, 1, col)
        key_lo, key_hi = self._column_keys(col)
        return QuantileBracket(
            q=float(q),
            n=int(self.n),
            ranks=np.array([lo_rank, hi_rank], dtype=np.int64),
            gamma=gamma,
            key_lo=key_lo.t().cpu().numpy(),
            key_hi=key_hi.t().cpu().numpy(),
            below=below.t().cpu().numpy(),
            inside=inside.t().cpu().numpy(),
        )

    def quantile(self, q: float) -> torch.Tensor:
        """Approximate q-quantile of each unit from the sketch alone.

        The two order statistics are read as bucket midpoints (exact for the zero
        bucket), so ``|result - exact| <= alpha * max(|x_lo|, |x_hi|)`` for normal
        floats outside the collapsed lowest buckets; use :class:`QuantileRefiner`
        for the exact value.

        Args:
            q: quantile in [0, 1].

        Returns:
            float64 tensor [U] (on the CPU).
        """
        return torch.from_numpy(self.bracket(q).estimate())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (see :meth:`from_state_dict`)."""
        state: dict[str, np.ndarray] = {
            "units": np.array(self.units, dtype=np.int64),
            "mantissa_bits": np.array(self.mantissa_bits, dtype=np.int64),
            "max_buckets": np.array(self.max_buckets, dtype=np.int64),
            "n": np.array(self.n, dtype=np.int64),
        }
        if self.floor is not None:
            state["floor"] = self.floor.cpu().numpy().copy()
        if self.zeros is not None:
            for name in ("zeros", "floor_count", "key_min", "key_max"):
                state[name] = getattr(self, name).cpu().numpy().copy()
        for sign, store in self.stores.items():
            for name, value in store.items():
                state[f"{sign}_{name}"] = value.cpu().numpy().copy()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], device: torch.device | str | None = None) -> QuantileSketch:
        """Rebuild a sketch from :meth:`state_dict`.

        Args:
            state: the arrays.
            device: where to put the histograms (default CPU).

        Returns:
            the sketch.
        """
        sketch = cls(
            int(state["units"]),
            mantissa_bits=int(state["mantissa_bits"]),
            max_buckets=int(state["max_buckets"]),
            floor=state.get("floor"),
            device=device or "cpu",
        )
        sketch.n = int(state["n"])
        if "zeros" in state:
            for name in ("zeros", "floor_count", "key_min", "key_max"):
                setattr(sketch, name, torch.as_tensor(np.asarray(state[name], dtype=np.int64), device=sketch.device))
            if sketch.floor is not None:
                sketch.floor = sketch.floor.to(sketch.device)
        for sign in ("pos", "neg"):
            if f"{sign}_counts" in state:
                sketch.stores[sign] = {
                    name: torch.as_tensor(np.asarray(state[f"{sign}_{name}"]), device=sketch.device)
                    for name in ("counts", "offset", "max")
                }
        return sketch


@dataclass
class QuantileBracket:
    """Where the two order statistics of a hazen quantile lie, per unit.

    Row 0 is the lower statistic (0-based rank ``ranks[0]``), row 1 the upper.

    Attributes:
        q: the quantile.
        n: number of values per unit.
        ranks: int64 [2], 0-based ranks of the two order statistics.
        gamma: interpolation weight (see :func:`hazen_ranks`).
        key_lo: int64 [2, U], smallest key the statistic may have.
        key_hi: int64 [2, U], largest key (inclusive); equal to key_lo once resolved.
        below: int64 [2, U], number of values with key < key_lo.
        inside: int64 [2, U], number of values with key_lo <= key <= key_hi.
    """

    q: float
    n: int
    ranks: np.ndarray
    gamma: float
    key_lo: np.ndarray
    key_hi: np.ndarray
    below: np.ndarray
    inside: np.ndarray

    @property
    def resolved(self) -> np.ndarray:
        """bool [2, U]: whether each statistic is known exactly."""
        return self.key_lo == self.key_hi

    @property
    def done(self) -> bool:
        """True when every statistic of every unit is known."""
        return bool(self.resolved.all())

    def values(self) -> np.ndarray:
        """The exact hazen quantiles.

        Returns:
            float64 array [U].
        """
        if not self.done:
            raise ValueError("bracket is not resolved: run a QuantileRefiner pass")
        stats = keys_to_float(self.key_lo)
        return hazen_lerp(stats[0], stats[1], self.gamma)

    def estimate(self) -> np.ndarray:
        """The quantiles with unresolved statistics read as bucket midpoints.

        Returns:
            float64 array [U].
        """
        lo = keys_to_float(self.key_lo).astype(np.float64)
        hi = keys_to_float(self.key_hi).astype(np.float64)
        mid = np.where(self.resolved, lo, lo / 2 + hi / 2)
        return hazen_lerp(mid[0], mid[1], self.gamma)

    def same(self, other: QuantileBracket) -> bool:
        """Whether two brackets describe the same refinement round."""
        return (
            self.q == other.q
            and self.n == other.n
            and np.array_equal(self.key_lo, other.key_lo)
            and np.array_equal(self.key_hi, other.key_hi)
            and np.array_equal(self.below, other.below)
        )

    def with_units(self, units: np.ndarray, other: QuantileBracket) -> QuantileBracket:
        """A copy with the units ``units`` (int [S]) taken from ``other``, a bracket of those
        units alone over the same values (same q and n)."""
        units = np.asarray(units, dtype=np.int64)
        if other.q != self.q or other.n != self.n or other.key_lo.shape != (2, units.size):
            raise ValueError("the other bracket must cover the same values for the given units")
        parts = {}
        for name in ("key_lo", "key_hi", "below", "inside"):
            mine = getattr(self, name).copy()
            mine[:, units] = getattr(other, name)
            parts[name] = mine
        return QuantileBracket(q=self.q, n=self.n, ranks=self.ranks, gamma=self.gamma, **parts)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (see :meth:`from_state_dict`)."""
        return {
            "q": np.array(self.q, dtype=np.float64),
            "n": np.array(self.n, dtype=np.int64),
            "ranks": self.ranks,
            "gamma": np.array(self.gamma, dtype=np.float64),
            "key_lo": self.key_lo,
            "key_hi": self.key_hi,
            "below": self.below,
            "inside": self.inside,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> QuantileBracket:
        """Rebuild a bracket from :meth:`state_dict`."""
        return cls(
            q=float(state["q"]),
            n=int(state["n"]),
            ranks=np.asarray(state["ranks"], np.int64),
            gamma=float(state["gamma"]),
            key_lo=np.asarray(state["key_lo"], np.int64),
            key_hi=np.asarray(state["key_hi"], np.int64),
            below=np.asarray(state["below"], np.int64),
            inside=np.asarray(state["inside"], np.int64),
        )


_RESOLVED, _COLLECT, _NARROW = 0, 1, 2


class QuantileRefiner:
    """One exact refinement pass over the same values a sketch saw.

    Statistics whose bracket holds few values are collected exactly; the rest
    (within the ``max_values`` budget) are histogrammed into ``bins`` finer
    sub-ranges. :meth:`bracket` then returns a narrower bracket, resolved for all
    collected statistics; repeat passes until ``bracket().done``. Each narrowing
    divides a range by ``bins``, so a 32-bit key range resolves in a few passes.

    Args:
        bracket: from :meth:`QuantileSketch.bracket` or a previous refiner.
        max_values: how many values a pass may collect in memory.
        bins: sub-ranges per crowded statistic.
    """

    def __init__(self, bracket: QuantileBracket, *, max_values: int = 1 << 23, bins: int = 4096) -> None:
        self.start = bracket
        self.bins = int(bins)
        self.max_values = int(max_values)
        units = bracket.key_lo.shape[1]
        self.units = units
        mode = np.where(bracket.resolved, _RESOLVED, _NARROW)
        shared = bracket.key_lo[0] == bracket.key_lo[1]
        cost = np.where(shared, bracket.inside[0], bracket.inside[0] + bracket.inside[1])
        unresolved = np.asarray(~bracket.resolved.all(axis=0))
        order = np.argsort(np.where(unresolved, cost, 0), kind="stable")
        budget = self.max_values
        for u in order:
            if not unresolved[u]:
                continue
            if cost[u] > budget:
                break
            budget -= int(cost[u])
            mode[:, u] = np.where(bracket.resolved[:, u], _RESOLVED, _COLLECT)
        self.mode = mode
        width = bracket.key_hi - bracket.key_lo + 1
        bits = np.array([[int(v).bit_length() for v in row] for row in (width - 1)], dtype=np.int64)
        self.shift = np.maximum(bits - int(math.log2(self.bins)), 0) if self.bins > 1 else bits
        self.collected_units: list[np.ndarray] = []
        self.collected_keys: list[np.ndarray] = []
        self.hist: torch.Tensor | None = None
        self._dev: dict[str, torch.Tensor] = {}
        self._device: torch.device | None = None

    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._device != device:
            b = self.start
            collect = self.mode == _COLLECT
            lo = np.where(collect, b.key_lo, 1)
            hi = np.where(collect, b.key_hi, 0)
            narrow = self.mode == _NARROW
            lo = np.clip(lo, -_ABS_MASK, _ABS_MASK).astype(np.int32)
            hi = np.clip(hi, -_ABS_MASK, _ABS_MASK).astype(np.int32)
            self._dev = {
                "c_lo0": torch.as_tensor(lo[0], device=device),
                "c_hi0": torch.as_tensor(hi[0], device=device),
                "c_lo1": torch.as_tensor(lo[1], device=device),
                "c_hi1": torch.as_tensor(hi[1], device=device),
                "n_lo": torch.as_tensor(np.where(narrow, b.key_lo, 1), device=device),
                "n_hi": torch.as_tensor(np.where(narrow, b.key_hi, 0), device=device),
                "shift": torch.as_tensor(self.shift, device=device),
            }
            self._device = device
        return self._dev

    @property
    def collecting(self) -> bool:
        """Whether any statistic is collected in this pass."""
        return bool((self.mode == _COLLECT).any())

    @property
    def narrowing(self) -> bool:
        """Whether any statistic is histogrammed in this pass."""
        return bool((self.mode == _NARROW).any())

    def add(self, x: torch.Tensor) -> None:
        """Add values (the same values, in any order and sharding, that the sketch saw).

        Args:
            x: float tensor [U, N].
        """
        self._add(_as_units_last(x, batched=False))

    def add_batch(self, x: torch.Tensor) -> None:
        """Add feature maps.

        Args:
            x: float tensor [B, U, ...].
        """
        self._add(_as_units_last(x, batched=True))

    def _add(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.units:
            raise ValueError(f"refiner has {self.units} units, data has {x.shape[1]}")
        if x.numel() == 0 or (not self.collecting and not self.narrowing):
            return
        t = self._tensors(x.device)
        key = float_keys(x)
        if self.collecting:
            lo0, hi0 = t["c_lo0"][None, :, None], t["c_hi0"][None, :, None]
            lo1, hi1 = t["c_lo1"][None, :, None], t["c_hi1"][None, :, None]
            mask = ((key >= lo0) & (key <= hi0)) | ((key >= lo1) & (key <= hi1))
            self.add_collected(key, mask)
        if self.narrowing:
            rows = []
            key = key.to(torch.int64)
            for stat in (0, 1):
                lo = t["n_lo"][stat][None, :, None]
                hi = t["n_hi"][stat][None, :, None]
                mask = (key >= lo) & (key <= hi)
                sub = (key - lo) >> t["shift"][stat][None, :, None]
                unit = torch.arange(self.units, device=key.device)[None, :, None].expand_as(key)
                rows.append(((stat * self.units + unit) * self.bins + sub)[mask])
            flat = torch.cat(rows)
            hist = torch.bincount(flat, minlength=2 * self.units * self.bins).view(2, self.units, self.bins)
            self.hist = hist if self.hist is None else self.hist + hist.to(self.hist.device)

    def add_collected(self, key: torch.Tensor, mask: torch.Tensor) -> None:
        """Add already-keyed values that lie in the collected ranges (used by the engine).

        Args:
            key: int tensor [A, U, P] of :func:`float_keys`.
            mask: bool tensor [A, U, P], True exactly where a key lies in a
                collected range of its unit.
        """
        unit = torch.arange(self.units, device=key.device)[None, :, None].expand_as(key)
        self.collected_units.append(unit[mask].to(torch.int32).cpu().numpy())
        self.collected_keys.append(key[mask].to(torch.int32).cpu().numpy())

    def collect_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """Key ranges collected in this pass.

        Returns:
            (lo, hi): int64 arrays [2, U]; an empty range is lo = 1, hi = 0.
        """
        collect = self.mode == _COLLECT
        return np.where(collect, self.start.key_lo, 1), np.where(collect, self.start.key_hi, 0)

    def merge(self, other: QuantileRefiner) -> QuantileRefiner:
        """Add another shard's pass into this one (in place).

        Args:
            other: a refiner built from the same bracket.

        Returns:
            self.
        """
        if not self.start.same(other.start) or not np.array_equal(self.mode, other.mode):
            raise ValueError("cannot merge refiners of different brackets")
        self.collected_units.extend(other.collected_units)
        self.collected_keys.extend(other.collected_keys)
        if other.hist is not None:
            self.hist = other.hist.clone() if self.hist is None else self.hist + other.hist.to(self.hist.device)
        return self

    def bracket(self) -> QuantileBracket:
        """The bracket after this pass.

        Returns:
            a bracket with every collected statistic resolved and every
            histogrammed one narrowed.
        """
        b = self.start
        key_lo, key_hi = b.key_lo.copy(), b.key_hi.copy()
        below, inside = b.below.copy(), b.inside.copy()
        if self.collecting:
            units = np.concatenate(self.collected_units) if self.collected_units else np.zeros(0, np.int32)
            keys = np.concatenate(self.collected_keys) if self.collected_keys else np.zeros(0, np.int32)
            order = np.lexsort((keys, units))
            units, keys = units[order].astype(np.int64), keys[order].astype(np.int64)
            starts = np.searchsorted(units, np.arange(self.units + 1))
            for stat, u in zip(*np.nonzero(self.mode == _COLLECT)):
                seg = keys[starts[u] : starts[u + 1]]
                first = np.searchsorted(seg, b.key_lo[stat, u], side="left")
                last = np.searchsorted(seg, b.key_hi[stat, u], side="right")
                if last - first != b.inside[stat, u]:
                    raise RuntimeError(
                        f"unit {u}: the refinement pass saw {last - first} values in the bracket, "
                        f"the sketch {b.inside[stat, u]}: the data changed between passes"
                    )
                value = seg[first + b.ranks[stat] - b.below[stat, u]]
                key_lo[stat, u] = key_hi[stat, u] = value
                below[stat, u] = b.below[stat, u] + np.searchsorted(seg[first:last], value, side="left")
                inside[stat, u] = np.count_nonzero(seg[first:last] == value)
        if self.narrowing:
            assert self.hist is not None or not (self.mode == _NARROW).any()
            hist = self.hist.cpu().numpy() if self.hist is not None else np.zeros((2, self.units, self.bins), np.int64)
            for stat, u in zip(*np.nonzero(self.mode == _NARROW)):
                h = hist[stat, u]
                if h.sum() != b.inside[stat, u]:
                    raise RuntimeError(
                        f"unit {u}: the refinement pass saw {h.sum()} values in the bracket, "
                        f"the sketch {b.inside[stat, u]}: the data changed between passes"
                    )
                csum = np.cumsum(h)
                target = b.ranks[stat] - b.below[stat, u]
                j = int(np.searchsorted(csum, target, side="right"))
                sh = int(self.shift[stat, u])
                lo = b.key_lo[stat, u] + (j << sh)
                hi = min(b.key_hi[stat, u], b.key_lo[stat, u] + ((j + 1) << sh) - 1)
                key_lo[stat, u], key_hi[stat, u] = lo, hi
                below[stat, u] = b.below[stat, u] + (csum[j - 1] if j > 0 else 0)
                inside[stat, u] = h[j]
        return QuantileBracket(
            q=b.q, n=b.n, ranks=b.ranks, gamma=b.gamma, key_lo=key_lo, key_hi=key_hi, below=below, inside=inside
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (see :meth:`from_state_dict`)."""
        state = {f"bracket_{k}": v for k, v in self.start.state_dict().items()}
        state["max_values"] = np.array(self.max_values, dtype=np.int64)
        state["bins"] = np.array(self.bins, dtype=np.int64)
        state["collected_units"] = (
            np.concatenate(self.collected_units) if self.collected_units else np.zeros(0, np.int32)
        )
        state["collected_keys"] = np.concatenate(self.collected_keys) if self.collected_keys else np.zeros(0, np.int32)
        if self.hist is not None:
            state["hist"] = self.hist.cpu().numpy().copy()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> QuantileRefiner:
        """Rebuild a refiner from :meth:`state_dict`."""
        bracket = QuantileBracket.from_state_dict(
            {k[len("bracket_") :]: v for k, v in state.items() if k.startswith("bracket_")}
        )
        refiner = cls(bracket, max_values=int(state["max_values"]), bins=int(state["bins"]))
        refiner.collected_units = [np.asarray(state["collected_units"], np.int32)]
        refiner.collected_keys = [np.asarray(state["collected_keys"], np.int32)]
        if "hist" in state:
            refiner.hist = torch.as_tensor(np.asarray(state["hist"]))
        return refiner


class _SketchArgs(TypedDict, total=False):
    """The keyword arguments of :class:`QuantileSketch`."""

    mantissa_bits: int
    max_buckets: int
    floor: torch.Tensor | np.ndarray | None
    device: torch.device | str | None


def exact_quantiles(x: torch.Tensor, q: float, **sketch_args: Unpack[_SketchArgs]) -> np.ndarray:
    """Exact per-unit hazen quantiles of an in-memory tensor via sketch + refinement.

    Args:
        x: float tensor [U, N].
        q: quantile in [0, 1].
        **sketch_args: passed to :class:`QuantileSketch`.

    Returns:
        float64 array [U], equal to ``np.quantile(x.double(), q, axis=1, method="hazen")``.
    """
    sketch = QuantileSketch(x.shape[0], **sketch_args)
    sketch.add(x)
    bracket = sketch.bracket(q)
    while not bracket.done:
        refiner = QuantileRefiner(bracket)
        refiner.add(x)
        bracket = refiner.bracket()
    return bracket.values()

"""Dataset-level unit x concept counts, and the top-activating images of each unit.

For each unit u and concept c, :class:`ConceptCounts` accumulates over every image
and mask pixel, as exact int64 integers:

- ``intersection[u, c]``: pixels where u is on (a_u > t_u) and c is present,
- ``act_area[u]``: pixels where u is on,
- ``concept_area[c]``: pixels where c is present,

from which ``IoU = intersection / (act_area + concept_area - intersection)``.
A pixel carries a concept through any of its label maps or through a whole-image
label, and counts once per concept even when several maps name it.

Intersections are counted from the "on" pixels only (a sparse list of
(image, unit, pixel) triples: about 1 - quantile of all pixels), each gathering
its pixel's deduplicated concepts into one ``bincount`` over
``unit * (C + 1) + concept``; so the cost scales with the on pixels, not with
units x pixels x concepts.

:class:`TopActivations` keeps each unit's top images by peak activation and, when
given them, the unit's native-resolution maps on those images (U x k maps in
all), merging across shards like the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import DatasetError
from .evidence import (
    DEFAULT_BLOCKS,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    LabelEvidence,
    cell_grid,
    image_blocks,
    label_evidence,
)

__all__ = ["ConceptCounts", "PixelLabels", "TopActivations", "prepare_labels"]

_CHUNK = 1 << 20


@dataclass
class PixelLabels:
    """The deduplicated concept labels of a batch at mask resolution.

    Attributes:
        pixel: int32 tensor [B, P, L]: per pixel, its concepts (0 = none): its map
            labels then the image's whole-image labels (L = K + J columns), with
            duplicates removed.
        image: int64 tensor [B, J]: whole-image labels, deduplicated (0 = none).
        concept_area: int64 tensor [C + 1]: pixels of the batch carrying each concept.
        size: (h, w) of the masks; P = h * w.
        indices: int64 tensor [B], the images' dataset indices (they decide each image's
            evidence block, see :mod:`~dissect_core.evidence`); default 0..B-1.
    """

    pixel: torch.Tensor
    image: torch.Tensor
    concept_area: torch.Tensor
    size: tuple[int, int]
    indices: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch(self) -> int:
        """Number of images B."""
        return self.pixel.shape[0]

    def rows(self, image: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """The concepts of some pixels.

        Args:
            image: int64 tensor [M], batch positions.
            pixel: int64 tensor [M], flat mask positions.

        Returns:
            int32 tensor [M, L] of concept numbers (0 = none), no duplicates in a row.
        """
        flat = self.pixel.reshape(-1, self.pixel.shape[2])
        return flat.index_select(0, image * self.pixel.shape[1] + pixel)

    def blocks(self, blocks: int) -> torch.Tensor:
        """int64 tensor [B]: each image's evidence block (of ``blocks``)."""
        key = ("blocks", blocks)
        if key not in self._cache:
            idx = self.indices if self.indices is not None else torch.arange(self.batch)
            self._cache[key] = torch.as_tensor(image_blocks(idx, blocks), device=self.pixel.device)
        return self._cache[key]

    def cells(self) -> tuple[torch.Tensor, int]:
        """int64 tensor [P]: each mask pixel's grid cell, and the number of cells G."""
        if "cells" not in self._cache:
            cell, g = cell_grid(self.size)
            self._cache["cells"] = (torch.as_tensor(cell, device=self.pixel.device), g)
        return self._cache["cells"]

    def concept_cells(self, blocks: int, num_concepts: int) -> torch.Tensor:
        """int64 tensor [blocks, C + 1, G]: the batch's concept pixels per block and grid cell
        (column 0 counts unlabelled entries; callers ignore it)."""
        key = ("concept_cells", blocks, num_concepts)
        if key not in self._cache:
            cell, g = self.cells()
            block = self.blocks(blocks)
            base = (block[:, None] * (num_concepts + 1)) * g + cell[None, :]  # [B, P]
            keys = self.pixel.to(torch.int64) * g + base[:, :, None]
            total = blocks * (num_concepts + 1) * g
            counts = (
                torch.bincount(keys.view(-1), minlength=total)
                if keys.numel()
                else torch.zeros(total, dtype=torch.int64, device=keys.device)
            )
            self._cache[key] = counts.view(blocks, num_concepts + 1, g)
        return self._cache[key]


def _dedupe_columns(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero every entry equal to an earlier entry along ``dim``."""
    x = x.clone()
    for k in range(1, x.shape[dim]):
        cur = x.select(dim, k)
        for j in range(k):
            cur.masked_fill_(cur == x.select(dim, j), 0)
    return x


def _check_range(t: torch.Tensor, what: str, num_concepts: int) -> None:
    if t.numel():
        lo, hi = (int(v) for v in torch.aminmax(t))
        if hi > num_concepts or lo < 0:
            raise DatasetError(
                f"{what} holds concept number {hi if hi > num_concepts else lo}, outside 0..{num_concepts}"
            )


def prepare_labels(
    label_maps: torch.Tensor,
    image_labels: torch.Tensor,
    num_concepts: int,
    *,
    size: tuple[int, int] | None = None,
    indices: torch.Tensor | None = None,
) -> PixelLabels:
    """Deduplicate a batch's labels once, for all layers.

    A pixel's concept counts once however many of its maps (or its image labels)
    name it. Columns that share no concept anywhere in the batch (the usual case:
    one map per category) are not compared at all.

    Args:
        label_maps: int tensor [B, K, h, w] of concept numbers (0 = none); K may be 0.
        image_labels: int tensor [B, J] of whole-image concept numbers (0 = none).
        num_concepts: C; every label must lie in [0, C].
        size: (h, w) when K == 0 (the mask size).
        indices: int64 tensor [B], the images' dataset indices (default 0..B-1).

    Returns:
        the batch's :class:`PixelLabels`.
    """
    b = label_maps.shape[0]
    if label_maps.dim() != 4:
        raise ValueError(f"label_maps must be [B, K, h, w], got {tuple(label_maps.shape)}")
    k = label_maps.shape[1]
    h, w = label_maps.shape[2:] if k else (size or label_maps.shape[2:])
    h, w = int(h), int(w)
    dev = label_maps.device
    maps = label_maps.reshape(b, k, h * w)
    image = image_labels.reshape(b, -1)
    _check_range(maps, "label map", num_concepts)
    _check_range(image, "image label", num_concepts)
    maps = maps.to(torch.int64)
    image = _dedupe_columns(image.to(torch.int64), 1)
    j = image.shape[1]
    width = num_concepts + 1
    # Per-column concept counts of the batch: which columns can hold the same concept.
    offsets = torch.arange(k, device=dev, dtype=torch.int64)[None, :, None] * width
    per_map = torch.bincount((maps + offsets).view(-1), minlength=k * width).view(k, width)
    per_image = torch.zeros((j, width), dtype=torch.int64, device=dev)
    if j:
        per_image.view(-1).index_add_(
            0, (image + torch.arange(j, device=dev)[None, :] * width).view(-1), torch.ones_like(image).view(-1)
        )
    present = torch.cat([per_map, per_image])[:, 1:] > 0
    shared = (present.to(torch.float32) @ present.t().to(torch.float32) > 0).tolist() if k else []
    if k and maps.data_ptr() == label_maps.data_ptr() and any(any(row) for row in shared):
        maps = maps.clone()  # the caller's tensor stays as it was
    changed = False
    for m in range(k):
        cur = maps[:, m]
        for i in range(j):  # a map label that is also the image's label counts once
            if shared[m][k + i]:
                cur.masked_fill_(cur == image[:, i, None], 0)
                changed = True
        for earlier in range(m):
            if shared[m][earlier]:
                cur.masked_fill_(cur == maps[:, earlier], 0)
                changed = True
    if changed:
        area = torch.bincount(maps.view(-1), minlength=width)
    else:
        area = per_map.sum(0)
    if j:
        area = area + per_image.sum(0) * (h * w)
    area[0] = 0
    pixel = torch.empty((b, h * w, k + j), dtype=torch.int32, device=dev)
    pixel[:, :, :k] = maps.permute(0, 2, 1)
    pixel[:, :, k:] = image[:, None, :]
    if indices is not None and tuple(indices.shape) != (b,):
        raise ValueError(f"indices must be [B] = [{b}], got {tuple(indices.shape)}")
    return PixelLabels(pixel=pixel, image=image, concept_area=area, size=(h, w), indices=indices)


class TopActivations:
    """The k images with the highest peak activation, per unit (ties: lower index first).

    When every batch comes with its feature maps, each unit's maps on its top
    images are kept too (``maps``, native resolution), so pictures of the unit
    need no second forward pass. Memory stays at U x k maps.

    Args:
        units: U.
        k: how many images to keep per unit.

    Attributes:
        values: float32 [U, k'] peak activations, best first (k' <= k).
        indices: int64 [U, k'] their dataset indices.
        maps: float32 [U, k', h, w], the unit's feature map on each of those
            images, or None (no data yet, or some data came without maps).
    """

    def __init__(self, units: int, k: int) -> None:
        self.units = int(units)
        self.k = int(k)
        self.values = torch.zeros(self.units, 0, dtype=torch.float32)
        self.indices = torch.zeros(self.units, 0, dtype=torch.int64)
        self.maps: torch.Tensor | None = None

    def _select(self, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Columns of the k best (value descending, then index ascending), as [U, k] positions."""
        order = torch.argsort(idx, dim=1, stable=True)
        best = torch.argsort(torch.gather(values, 1, order), dim=1, descending=True, stable=True)[:, : self.k]
        return torch.gather(order, 1, best)

    def _combine(self, values: torch.Tensor, idx: torch.Tensor, new_maps: torch.Tensor | None, new_major: bool) -> None:
        """Keep the best of the current entries followed by new ones (their maps: [N, U, h, w] when
        ``new_major`` is False, else [U, N, h, w]; None when they came without maps)."""
        old = self.values.shape[1]
        keep_maps = new_maps is not None and (self.maps is not None or old == 0)
        pos = self._select(values, idx)
        self.values, self.indices = torch.gather(values, 1, pos), torch.gather(idx, 1, pos)
        if not keep_maps:
            self.maps = None
            return
        assert new_maps is not None
        from_old = pos < old
        if self.maps is not None and pos.shape[1] == old and bool(from_old.all()):
            return
        h, w = new_maps.shape[-2:]
        dev = pos.device
        out = torch.empty((self.units, pos.shape[1], h, w), dtype=torch.float32, device=dev)
        unit = torch.arange(self.units, device=dev)[:, None].expand_as(pos)
        if self.maps is not None and bool(from_old.any()):
            out[from_old] = self.maps.to(dev)[unit[from_old], pos[from_old]]
        fresh = ~from_old
        if new_major:
            out[fresh] = new_maps.to(dev, torch.float32)[unit[fresh], pos[fresh] - old]
        else:
            out[fresh] = new_maps.to(dev, torch.float32)[pos[fresh] - old, unit[fresh]]
        self.maps = out

    def add(self, peaks: torch.Tensor, indices: torch.Tensor, maps: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            peaks: float tensor [B, U], each image's peak (spatial max) activation.
            indices: int64 tensor [B], the images' dataset indices.
            maps: float tensor [B, U, h, w], the feature maps themselves (optional;
                without them the kept maps are dropped).
        """
        if self.k == 0 or peaks.shape[0] == 0:
            return
        dev = peaks.device
        if maps is not None and (maps.shape[:2] != peaks.shape or maps.dim() != 4):
            raise ValueError(f"maps {tuple(maps.shape)} do not match peaks {tuple(peaks.shape)}")
        if self.maps is not None and maps is not None and self.maps.shape[2:] != maps.shape[2:]:
            raise ValueError(f"maps of size {tuple(maps.shape[2:])}, kept ones are {tuple(self.maps.shape[2:])}")
        values = torch.cat([self.values.to(dev), peaks.t().to(torch.float32)], dim=1)
        idx = torch.cat([self.indices.to(dev), indices.to(dev).to(torch.int64)[None, :].expand(self.units, -1)], dim=1)
        self._combine(values, idx, maps, new_major=False)

    def merge(self, other: TopActivations) -> TopActivations:
        """Merge another shard's top images (in place).

        Args:
            other: with the same units and k.

        Returns:
            self (keeping maps only when both sides have them, or one side is empty).
        """
        if (other.units, other.k) != (self.units, self.k):
            raise ValueError("cannot merge top images of different shapes")
        if other.values.shape[1]:
            if self.maps is not None and other.maps is not None and self.maps.shape[2:] != other.maps.shape[2:]:
                raise ValueError("cannot merge top maps of different sizes")
            dev = self.values.device
            values = torch.cat([self.values, other.values.to(dev)], 1)
            idx = torch.cat([self.indices, other.indices.to(dev)], 1)
            self._combine(values, idx, other.maps, new_major=True)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (see :meth:`from_state_dict`)."""
        state = {
            "k": np.array(self.k, dtype=np.int64),
            "values": self.values.cpu().numpy().copy(),
            "indices": self.indices.cpu().numpy().copy(),
        }
        if self.maps is not None:
            state["maps"] = self.maps.cpu().numpy().copy()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> TopActivations:
        """Rebuild from :meth:`state_dict`."""
        values = torch.as_tensor(np.asarray(state["values"], np.float32))
        top = cls(values.shape[0], int(state["k"]))
        top.values = values
        top.indices = torch.as_tensor(np.asarray(state["indices"], np.int64))
        if "maps" in state:
            top.maps = torch.as_tensor(np.asarray(state["maps"], np.float32))
        return top


class ConceptCounts:
    """Exact unit x concept counts of one layer (see module docstring), kept per evidence block.

    Every tally is kept per block of images (``blocks``, by dataset index, see
    :mod:`~dissect_core.evidence`), and the on-pixels and concept pixels also per cell of
    a coarse grid over the mask; ``intersection``, ``act_area`` and ``concept_area`` are
    their sums, and :meth:`evidence` turns them into each label's interval, stability,
    runner-up and chance level. Memory is fixed: blocks x U x (C + 1) integers.

    Args:
        units: U.
        num_concepts: C (concepts are numbered 1..C; column 0 stays 0).
        top_k: keep the top-k images per unit by peak activation (0: none).
        device: where the accumulators live (default: the device of the first batch).
        blocks: evidence blocks (1: plain counts, no evidence).

    Attributes:
        block_intersection: int32 (int64 once a block could overflow it) [blocks, U, C + 1].
        block_act: int64 [blocks, U, G]: on-pixels per block and grid cell.
        block_concept: int64 [blocks, C + 1, G]: concept pixels per block and grid cell.
        block_images: int64 [blocks]. cell_pixels: int64 [G], pixels per cell of one mask.
        n_pixels, n_images: ints.
        top: :class:`TopActivations` (with the top maps, when kept) or None.
    """

    def __init__(
        self,
        units: int,
        num_concepts: int,
        *,
        top_k: int = 0,
        device: torch.device | str | None = None,
        blocks: int = DEFAULT_BLOCKS,
    ) -> None:
        if blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks}")
        self.units = int(units)
        self.num_concepts = int(num_concepts)
        self.blocks = int(blocks)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        width = self.num_concepts + 1
        self.block_intersection = torch.zeros(self.blocks, self.units, width, dtype=torch.int32, device=dev)
        self.block_act = torch.zeros(self.blocks, self.units, 0, dtype=torch.int64, device=dev)
        self.block_concept = torch.zeros(self.blocks, width, 0, dtype=torch.int64, device=dev)
        self.block_images = torch.zeros(self.blocks, dtype=torch.int64, device=dev)
        self.cell_pixels = torch.zeros(0, dtype=torch.int64)
        self.mask_size: tuple[int, int] | None = None
        self.n_pixels = 0
        self.n_images = 0
        self.top: TopActivations | None = TopActivations(self.units, top_k) if top_k else None
        self._placed = device is not None

    # -- the dataset-level counts ------------------------------------------------------------

    @property
    def intersection(self) -> torch.Tensor:
        """int64 [U, C + 1]: on-pixels of u carrying concept c (column 0 is 0)."""
        out = self.block_intersection.sum(0, dtype=torch.int64)
        out[:, 0] = 0
        return out

    @property
    def act_area(self) -> torch.Tensor:
        """int64 [U]: pixels where u is on."""
        return self.block_act.sum((0, 2)) if self.block_act.shape[2] else self.block_act.new_zeros(self.units)

    @property
    def concept_area(self) -> torch.Tensor:
        """int64 [C + 1]: pixels carrying each concept (column 0 is 0)."""
        if not self.block_concept.shape[2]:
            return self.block_concept.new_zeros(self.num_concepts + 1)
        out = self.block_concept.sum((0, 2))
        out[0] = 0
        return out

    # -- counting ----------------------------------------------------------------------------

    def _to(self, device: torch.device) -> None:
        if not self._placed:
            self.block_intersection = self.block_intersection.to(device)
            self.block_act = self.block_act.to(device)
            self.block_concept = self.block_concept.to(device)
            self.block_images = self.block_images.to(device)
            self._placed = True

    def _grid(self, size: tuple[int, int], device: torch.device) -> None:
        """Size the per-cell tallies for masks of ``size`` (once; later batches must match)."""
        if self.mask_size is None:
            cell, g = cell_grid(size)
            self.mask_size = (int(size[0]), int(size[1]))
            self.cell_pixels = torch.as_tensor(np.bincount(cell, minlength=g).astype(np.int64))
            self.block_act = torch.zeros(self.blocks, self.units, g, dtype=torch.int64, device=device)
            self.block_concept = torch.zeros(self.blocks, self.num_concepts + 1, g, dtype=torch.int64, device=device)
        elif tuple(size) != self.mask_size:
            raise ValueError(f"masks of size {tuple(size)}, earlier ones were {self.mask_size}")

    def add(
        self,
        on: torch.Tensor,
        label_maps: torch.Tensor | PixelLabels,
        image_labels: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ) -> None:
        """Count one batch.

        Args:
            on: bool tensor [B, U, h, w]: unit on at a mask pixel (a_u > t_u).
            label_maps: int tensor [B, K, h, w] of concept numbers, or the batch's
                :class:`PixelLabels` (then image_labels and indices are ignored).
            image_labels: int tensor [B, J] of whole-image concept numbers.
            indices: int64 tensor [B], the images' dataset indices (default 0..B-1:
                give them when counting a dataset in several batches, or the evidence
                blocks repeat).
        """
        b, u, h, w = on.shape
        if u != self.units:
            raise ValueError(f"counts have {self.units} units, the mask has {u}")
        if isinstance(label_maps, PixelLabels):
            labels = label_maps
        else:
            if image_labels is None:
                image_labels = torch.zeros((b, 0), dtype=torch.int64, device=on.device)
            labels = prepare_labels(
                label_maps.to(on.device),
                image_labels.to(on.device),
                self.num_concepts,
                size=(h, w),
                indices=None if indices is None else indices.to(on.device),
            )
        if labels.size != (h, w) or labels.batch != b:
            raise ValueError(f"labels are {labels.batch} x {labels.size}, the mask {b} x {(h, w)}")
        self.add_area(labels)
        per_image = max(1, _CHUNK * 16 // max(1, u * h * w))
        for start in range(0, b, per_image):
            flat = on[start : start + per_image].reshape(-1, u, h * w)
            bi, ui, pi = flat.nonzero(as_tuple=True)
            self.add_pixels(bi + start, ui, pi, labels)

    def add_area(self, labels: PixelLabels) -> None:
        """Add a batch's concept areas and pixel and image totals (once per batch).

        Args:
            labels: the batch's :class:`PixelLabels`.
        """
        self._to(labels.pixel.device)
        self._grid(labels.size, self.block_concept.device)
        dev = self.block_concept.device
        self.block_concept += labels.concept_cells(self.blocks, self.num_concepts).to(dev)
        self.block_images += torch.bincount(labels.blocks(self.blocks), minlength=self.blocks).to(dev)
        self.n_pixels += labels.batch * labels.size[0] * labels.size[1]
        self.n_images += labels.batch
        self._widen()

    def _widen(self) -> None:
        """Move the intersections to int64 before any block could hold 2**31 pixels."""
        if self.block_intersection.dtype == torch.int32 and self.mask_size is not None:
            pixels = int(self.block_images.max()) * self.mask_size[0] * self.mask_size[1]
            if pixels >= 2**31 - 1:
                self.block_intersection = self.block_intersection.to(torch.int64)

    def add_pixels(self, image: torch.Tensor, unit: torch.Tensor, pixel: torch.Tensor, labels: PixelLabels) -> None:
        """Count "on" pixels given as triples (areas must be added by :meth:`add_area`).

        Args:
            image: int64 tensor [M], batch position of each on pixel.
            unit: int64 tensor [M], its unit.
            pixel: int64 tensor [M], its flat mask position (y * w + x).
            labels: the batch's :class:`PixelLabels`.
        """
        block = labels.blocks(self.blocks)
        cells, _ = labels.cells()
        for start in range(0, unit.numel(), _CHUNK):
            sl = slice(start, start + _CHUNK)
            im, px = image[sl], pixel[sl]
            self.add_rows(unit[sl], labels.rows(im, px), block.index_select(0, im), cells.index_select(0, px))

    def add_rows(self, unit: torch.Tensor, concepts: torch.Tensor, block: torch.Tensor, cell: torch.Tensor) -> None:
        """Count "on" pixels given by unit, deduplicated concept row, evidence block and grid cell
        (after :meth:`add_area` has seen a batch of the same mask size).

        Args:
            unit: int64 tensor [M], the unit of each on pixel.
            concepts: int tensor [M, L], the pixel's concepts (0 = none, no duplicates in a row).
            block: int64 tensor [M], the block of the pixel's image.
            cell: int64 tensor [M], the pixel's grid cell.
        """
        self._to(unit.device)
        if unit.numel() == 0:
            return
        g = self.block_act.shape[2]
        if g == 0:
            raise ValueError("add_rows before any add_area: the mask size is not known yet")
        dev = self.block_act.device
        bu = block.to(unit.device) * self.units + unit
        # index_add_ touches only the counted entries; a bincount would build and add whole tables.
        act = self.block_act.view(-1)
        where = (bu * g + cell.to(unit.device)).to(dev)
        act.index_add_(0, where, torch.ones(1, dtype=act.dtype, device=dev).expand(where.numel()))
        if concepts.shape[1] == 0:
            return
        inter = self.block_intersection.view(-1)
        width = self.num_concepts + 1
        if inter.numel() < 2**31:  # int32 indices: half the memory traffic
            flat = concepts.to(torch.int32, copy=True)
            flat += (bu.to(torch.int32) * width)[:, None]
        else:
            flat = bu[:, None] * width + concepts.to(torch.int64)
        flat = flat.view(-1).to(inter.device)
        inter.index_add_(0, flat, torch.ones(1, dtype=inter.dtype, device=inter.device).expand(flat.numel()))

    def merge(self, other: ConceptCounts) -> ConceptCounts:
        """Add another shard's counts (in place).

        Args:
            other: counts with the same units, concepts and blocks (and mask size).

        Returns:
            self.
        """
        if (other.units, other.num_concepts, other.blocks) != (self.units, self.num_concepts, self.blocks):
            raise ValueError("cannot merge counts of different shapes")
        if other.mask_size is not None:
            if self.mask_size is None:
                self._grid(other.mask_size, self.block_concept.device)
            elif self.mask_size != other.mask_size:
                raise ValueError(f"cannot merge counts of masks {other.mask_size} into {self.mask_size}")
            dev = self.block_act.device
            self.block_act += other.block_act.to(dev)
            self.block_concept += other.block_concept.to(dev)
        self.block_images += other.block_images.to(self.block_images.device)
        self._widen()
        if other.block_intersection.dtype == torch.int64:
            self.block_intersection = self.block_intersection.to(torch.int64)
        self.block_intersection += other.block_intersection.to(self.block_intersection.device)
        self.n_pixels += other.n_pixels
        self.n_images += other.n_images
        if other.top is not None:
            if self.top is None:
                self.top = TopActivations(other.top.units, other.top.k)
            self.top.merge(other.top)
        return self

    def iou(self) -> np.ndarray:
        """Dataset-level IoU.

        Returns:
            float64 array [U, C + 1]; column 0 and empty unions are 0.
        """
        inter = self.intersection.cpu().numpy().astype(np.float64)
        union = (
            self.act_area.cpu().numpy()[:, None].astype(np.float64)
            + self.concept_area.cpu().numpy()[None, :].astype(np.float64)
            - inter
        )
        out = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        out[:, 0] = 0.0
        return out

    def evidence(self, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> LabelEvidence:
        """Each unit's label evidence (columns are concepts 1..C, as in :meth:`iou` without
        column 0); see :func:`~dissect_core.evidence.label_evidence`."""
        g = self.block_act.shape[2]
        inter = self.block_intersection[:, :, 1:].cpu().numpy()
        act = self.block_act.cpu().numpy() if g else np.zeros((self.blocks, self.units, 1), np.int64)
        con = self.block_concept[:, 1:].cpu().numpy() if g else np.zeros((self.blocks, self.num_concepts, 1), np.int64)
        cells = self.cell_pixels.numpy() if g else np.ones(1, np.int64)
        return label_evidence(inter, act, con, self.block_images.cpu().numpy(), cells, resamples=resamples, seed=seed)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (see :meth:`from_state_dict`)."""
        state = {
            "block_intersection": self.block_intersection.cpu().numpy().copy(),
            "block_act": self.block_act.cpu().numpy().copy(),
            "block_concept": self.block_concept.cpu().numpy().copy(),
            "block_images": self.block_images.cpu().numpy().copy(),
            "mask_size": np.array(self.mask_size if self.mask_size is not None else (0, 0), dtype=np.int64),
            "n_pixels": np.array(self.n_pixels, dtype=np.int64),
            "n_images": np.array(self.n_images, dtype=np.int64),
        }
        if self.top is not None:
            state.update({f"top_{k}": v for k, v in self.top.state_dict().items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> ConceptCounts:
        """Rebuild from :meth:`state_dict` (or the plain counts of an older version: one block,
        one grid cell, no evidence)."""
        if "block_intersection" not in state:
            return cls._from_plain_state(state)
        inter = np.asarray(state["block_intersection"])
        counts = cls(inter.shape[1], inter.shape[2] - 1, device="cpu", blocks=inter.shape[0])
        counts.block_intersection = torch.as_tensor(inter.astype(inter.dtype if inter.dtype == np.int64 else np.int32))
        size = tuple(int(v) for v in np.asarray(state["mask_size"]))
        if size != (0, 0):
            counts._grid((size[0], size[1]), torch.device("cpu"))
            counts.block_act = torch.as_tensor(np.asarray(state["block_act"], np.int64))
            counts.block_concept = torch.as_tensor(np.asarray(state["block_concept"], np.int64))
        counts.block_images = torch.as_tensor(np.asarray(state["block_images"], np.int64))
        counts.n_pixels = int(state["n_pixels"])
        counts.n_images = int(state["n_images"])
        if "top_k" in state:
            counts.top = TopActivations.from_state_dict(
                {k[len("top_") :]: v for k, v in state.items() if k.startswith("top_")}
            )
        return counts

    @classmethod
    def _from_plain_state(cls, state: dict[str, np.ndarray]) -> ConceptCounts:
        inter = np.asarray(state["intersection"], np.int64)
        counts = cls(inter.shape[0], inter.shape[1] - 1, device="cpu", blocks=1)
        n_images, n_pixels = int(state["n_images"]), int(state["n_pixels"])
        counts.block_intersection = torch.as_tensor(inter[None])
        counts.block_act = torch.as_tensor(np.asarray(state["act_area"], np.int64)[None, :, None])
        counts.block_concept = torch.as_tensor(np.asarray(state["concept_area"], np.int64)[None, :, None])
        counts.block_images = torch.tensor([n_images], dtype=torch.int64)
        counts.cell_pixels = torch.tensor([n_pixels // max(1, n_images)], dtype=torch.int64)
        counts.mask_size = (0, 0)  # unknown: merges only with counts of the same old kind
        counts.n_pixels, counts.n_images = n_pixels, n_images
        if "top_k" in state:
            counts.top = TopActivations.from_state_dict(
                {k[len("top_") :]: v for k, v in state.items() if k.startswith("top_")}
            )
        return counts

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

from dataclasses import dataclass

import numpy as np
import torch

from .errors import DatasetError

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
    """

    pixel: torch.Tensor
    image: torch.Tensor
    concept_area: torch.Tensor
    size: tuple[int, int]

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
    return PixelLabels(pixel=pixel, image=image, concept_area=area, size=(h, w))


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
    """Exact unit x concept counts of one layer (see module docstring).

    Args:
        units: U.
        num_concepts: C (concepts are numbered 1..C; column 0 stays 0).
        top_k: keep the top-k images per unit by peak activation (0: none).
        device: where the accumulators live (default: the device of the first batch).

    Attributes:
        intersection: int64 [U, C + 1]. act_area: int64 [U].
        concept_area: int64 [C + 1]. n_pixels, n_images: ints.
        top: :class:`TopActivations` (with the top maps, when kept) or None.
    """

    def __init__(
        self,
        units: int,
        num_concepts: int,
        *,
        top_k: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        self.units = int(units)
        self.num_concepts = int(num_concepts)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.intersection = torch.zeros(self.units, self.num_concepts + 1, dtype=torch.int64, device=dev)
        self.act_area = torch.zeros(self.units, dtype=torch.int64, device=dev)
        self.concept_area = torch.zeros(self.num_concepts + 1, dtype=torch.int64, device=dev)
        self.n_pixels = 0
        self.n_images = 0
        self.top: TopActivations | None = TopActivations(self.units, top_k) if top_k else None
        self._placed = device is not None

    def _to(self, device: torch.device) -> None:
        if not self._placed:
            self.intersection = self.intersection.to(device)
            self.act_area = self.act_area.to(device)
            self.concept_area = self.concept_area.to(device)
            self._placed = True

    def add(
        self,
        on: torch.Tensor,
        label_maps: torch.Tensor | PixelLabels,
        image_labels: torch.Tensor | None = None,
    ) -> None:
        """Count one batch.

        Args:
            on: bool tensor [B, U, h, w]: unit on at a mask pixel (a_u > t_u).
            label_maps: int tensor [B, K, h, w] of concept numbers, or the batch's
                :class:`PixelLabels` (then image_labels is ignored).
            image_labels: int tensor [B, J] of whole-image concept numbers.
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
                label_maps.to(on.device), image_labels.to(on.device), self.num_concepts, size=(h, w)
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
        self._to(labels.concept_area.device)
        self.concept_area += labels.concept_area.to(self.concept_area.device)
        self.n_pixels += labels.batch * labels.size[0] * labels.size[1]
        self.n_images += labels.batch

    def add_pixels(self, image: torch.Tensor, unit: torch.Tensor, pixel: torch.Tensor, labels: PixelLabels) -> None:
        """Count "on" pixels given as triples (areas must be added by :meth:`add_area`).

        Args:
            image: int64 tensor [M], batch position of each on pixel.
            unit: int64 tensor [M], its unit.
            pixel: int64 tensor [M], its flat mask position (y * w + x).
            labels: the batch's :class:`PixelLabels`.
        """
        for start in range(0, unit.numel(), _CHUNK):
            sl = slice(start, start + _CHUNK)
            self.add_rows(unit[sl], labels.rows(image[sl], pixel[sl]))

    def add_rows(self, unit: torch.Tensor, concepts: torch.Tensor) -> None:
        """Count "on" pixels given by unit and deduplicated concept row.

        Args:
            unit: int64 tensor [M], the unit of each on pixel.
            concepts: int tensor [M, L], the pixel's concepts (0 = none, no duplicates in a row).
        """
        self._to(unit.device)
        if unit.numel() == 0:
            return
        self.act_area += torch.bincount(unit, minlength=self.units).to(self.act_area.device)
        if concepts.shape[1] == 0:
            return
        inter = self.intersection.view(-1)
        width = self.num_concepts + 1
        if self.units * width < 2**31:  # int32 indices: half the memory traffic
            flat = concepts.to(torch.int32, copy=True)
            flat += (unit.to(torch.int32) * width)[:, None]
        else:
            flat = unit[:, None] * width + concepts.to(torch.int64)
        inter += torch.bincount(flat.view(-1), minlength=inter.numel()).to(inter.device)
        self.intersection[:, 0] = 0

    def merge(self, other: ConceptCounts) -> ConceptCounts:
        """Add another shard's counts (in place).

        Args:
            other: counts with the same units and concepts.

        Returns:
            self.
        """
        if (other.units, other.num_concepts) != (self.units, self.num_concepts):
            raise ValueError("cannot merge counts of different shapes")
        self.intersection += other.intersection.to(self.intersection.device)
        self.act_area += other.act_area.to(self.act_area.device)
        self.concept_area += other.concept_area.to(self.concept_area.device)
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

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (see :meth:`from_state_dict`)."""
        state = {
            "intersection": self.intersection.cpu().numpy().copy(),
            "act_area": self.act_area.cpu().numpy().copy(),
            "concept_area": self.concept_area.cpu().numpy().copy(),
            "n_pixels": np.array(self.n_pixels, dtype=np.int64),
            "n_images": np.array(self.n_images, dtype=np.int64),
        }
        if self.top is not None:
            state.update({f"top_{k}": v for k, v in self.top.state_dict().items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> ConceptCounts:
        """Rebuild from :meth:`state_dict`."""
        inter = np.asarray(state["intersection"], np.int64)
        counts = cls(inter.shape[0], inter.shape[1] - 1, device="cpu")
        counts.intersection = torch.as_tensor(inter)
        counts.act_area = torch.as_tensor(np.asarray(state["act_area"], np.int64))
        counts.concept_area = torch.as_tensor(np.asarray(state["concept_area"], np.int64))
        counts.n_pixels = int(state["n_pixels"])
        counts.n_images = int(state["n_images"])
        if "top_k" in state:
            counts.top = TopActivations.from_state_dict(
                {k[len("top_") :]: v for k, v in state.items() if k.startswith("top_")}
            )
        return counts

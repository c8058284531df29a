"""Object-part concepts made from object masks, as in the paper.

Every connected component (8-connectivity) of every object concept in an object
label map is cut at the middle of its bounding box, as the reference code
(``expand_segment_quad`` in davidbau/dissect) does: with the box spanning rows
``top..bottom`` and columns ``left..right`` (inclusive), ``vmid = (top + bottom +
1) // 2`` and ``hmid = (left + right + 1) // 2``; the part ``<obj>-t`` is the
component's pixels in rows ``< vmid``, ``<obj>-b`` those in rows ``>= vmid``,
``<obj>-l`` those in columns ``< hmid`` and ``<obj>-r`` those in columns
``>= hmid``. So a part mask is the component's own pixels inside that half of
its box (never background pixels of the box), and for an odd size the middle
row goes to the bottom half and the middle column to the right half.

Top and bottom halves partition a component, and so do left and right, and the
components of one label map never overlap; so the top/bottom parts of one
object map fit on one extra label map and the left/right parts on a second one
(the reference also uses two extra channels). Each object label map of a sample
therefore yields two part maps.
"""

from __future__ import annotations

import numpy as np

from .concepts import Concept, ConceptDataset, Sample, size_pair

try:
    from scipy import ndimage as _ndimage
except ImportError:
    _ndimage = None

__all__ = ["PART_SUFFIXES", "WithPartConcepts", "connected_components", "quad_part_maps"]

PART_SUFFIXES: tuple[str, ...] = ("t", "b", "l", "r")

_EIGHT = np.ones((3, 3), dtype=bool)


def _components_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        smallest = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(smallest, padded[dy : dy + h, dx : dx + w], out=smallest)
        smallest = np.where(mask, smallest, big)
        flat = smallest.ravel()
        fg = flat < big
        flat[fg] = flat[flat[fg] - 1]
        smallest = flat.reshape(h, w)
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    roots = np.unique(labels[mask])
    out = np.zeros((h, w), np.int32)
    if len(roots):
        out[mask] = np.searchsorted(roots, labels[mask]) + 1
    return out, len(roots)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected components of a boolean mask.

    Uses ``scipy.ndimage.label`` when scipy is importable, else a numpy
    min-label propagation; both number components 1..n in raster order of
    their first pixel.

    Args:
        mask: bool array [h, w].

    Returns:
        (labels, n): int32 array [h, w] with 0 outside the mask and 1..n
        inside, and the number of components n.
    """
    mask = np.asarray(mask, dtype=bool)
    if _ndimage is not None:
        labels, n = _ndimage.label(mask, structure=_EIGHT)
        return labels.astype(np.int32), int(n)
    return _components_numpy(mask)


def quad_part_maps(label_map: np.ndarray, part_base: np.ndarray) -> np.ndarray:
    """Top/bottom and left/right part maps of one object label map.

    Args:
        label_map: int array [h, w] of concept numbers (0 = none).
        part_base: int array [C + 1] indexed by concept number: for an object
            concept, the number of its ``-t`` part concept, whose ``-b``, ``-l``,
            ``-r`` parts follow it as ``+1``, ``+2``, ``+3``; 0 for concepts
            that are not expanded.

    Returns:
        int32 array [2, h, w]: map 0 holds ``-t`` and ``-b`` part numbers, map 1
        holds ``-l`` and ``-r`` part numbers, 0 elsewhere.
    """
    label_map = np.asarray(label_map)
    h, w = label_map.shape
    out = np.zeros((2, h, w), np.int32)
    present = np.unique(label_map)
    present = present[(present > 0) & (present < len(part_base))]
    rows = np.arange(h)[:, None]
    cols = np.arange(w)[None, :]
    for number in present:
        base = int(part_base[number])
        if base == 0:
            continue
        components, n = connected_components(label_map == number)
        if n == 0:
            continue
        if _ndimage is not None:
            boxes = _ndimage.find_objects(components)
        else:
            boxes = []
            for k in range(1, n + 1):
                ys, xs = np.nonzero(components == k)
                boxes.append((slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)))
        for k, (ys, xs) in enumerate(boxes, start=1):
            sub = components[ys, xs] == k
            vmid = (ys.start + ys.stop) // 2
            hmid = (xs.start + xs.stop) // 2
            r = rows[ys.start : ys.stop]
            c = cols[:, xs.start : xs.stop]
            out[0, ys, xs] = np.where(sub, np.where(r < vmid, base, base + 1), out[0, ys, xs])
            out[1, ys, xs] = np.where(sub, np.where(c < hmid, base + 2, base + 3), out[1, ys, xs])
    return out


class WithPartConcepts(ConceptDataset):
    """A dataset with the paper's object-part concepts added.

    For every concept of ``category`` (in concept-number order) four concepts
    ``<name>-t``, ``<name>-b``, ``<name>-l``, ``<name>-r`` of category
    ``"part"`` are numbered after the wrapped dataset's last concept. Every
    label map of a sample that holds any concept of ``category`` yields two more
    label maps, appended after the existing ones (see :func:`quad_part_maps`).

    Args:
        dataset: the dataset to extend.
        category: the category whose concepts are expanded (default "object").
    """

    def __init__(self, dataset: ConceptDataset, category: str = "object") -> None:
        self.dataset = dataset
        self.name = dataset.name
        self.image_size = size_pair(dataset.image_size)
        self.mask_size = size_pair(dataset.mask_size)
        self.classes = list(getattr(dataset, "classes", []))
        self.category = category
        self.concepts = list(dataset.concepts)
        self.categories = list(dataset.categories)
        self._part_base = np.zeros(len(self.concepts) + 1, np.int32)
        for concept in dataset.concepts:
            if concept.category != category:
                continue
            self._part_base[concept.number] = len(self.concepts) + 1
            for suffix in PART_SUFFIXES:
                self.concepts.append(Concept(len(self.concepts) + 1, f"{concept.name}-{suffix}", "part"))
        if len(self.concepts) > len(dataset.concepts) and "part" not in self.categories:
            self.categories.append("part")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[index]
        maps = np.asarray(sample.label_maps, dtype=np.int32)
        if maps.ndim != 3 or maps.shape[0] == 0:
            return sample
        extra = []
        for label_map in maps:
            clipped = np.where(label_map < len(self._part_base), label_map, 0)
            if self._part_base[clipped].any():
                extra.append(quad_part_maps(label_map, self._part_base))
        if not extra:
            return sample
        return Sample(
            image=sample.image,
            label_maps=np.concatenate([maps, *extra], axis=0),
            image_labels=sample.image_labels,
            class_label=sample.class_label,
            latent=sample.latent,
        )

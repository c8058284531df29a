"""The data contract between concept sources and the dissection engine.

A concept dataset yields :class:`Sample` objects: an RGB image at the dataset's
``image_size`` and its concept masks at ``mask_size`` (Broden: half the image
size). Concepts are numbered densely from 1; number 0 means "no concept".
A pixel may carry several concepts, one per label map (one per category, or
one per mask file in Broden).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import SupportsInt

import numpy as np
import torch

__all__ = ["Batch", "Concept", "ConceptDataset", "Sample", "collate_samples"]


def size_pair(size: Iterable[SupportsInt]) -> tuple[int, int]:
    """A size ``(H, W)`` as two ints, from a tuple, list, ``torch.Size`` or array shape of two values."""
    h, w = size
    return int(h), int(w)


@dataclass(frozen=True)
class Concept:
    """One visual concept.

    Attributes:
        number: dense id, 1..C (0 is reserved for "no concept").
        name: concept name, e.g. ``"tree"``, ``"red-c"``, ``"tree-t"``.
        category: e.g. ``"object"``, ``"part"``, ``"material"``, ``"color"``.
    """

    number: int
    name: str
    category: str


@dataclass
class Sample:
    """One image with its concept annotations.

    Attributes:
        image: uint8 array [H, W, 3], RGB, H x W == dataset.image_size.
        label_maps: int32 array [K, sh, sw] of concept numbers (0 = none),
            sh x sw == dataset.mask_size. K may be 0.
        image_labels: int32 array [J] of whole-image concept numbers; such a
            concept covers every pixel of the image.
        class_label: index into dataset.classes (scene class), -1 if unknown.
        latent: float32 array [Z], the latent a generator made the image from
            (generated datasets only; None otherwise).
    """

    image: np.ndarray
    label_maps: np.ndarray
    image_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    class_label: int = -1
    latent: np.ndarray | None = None


@dataclass
class Batch:
    """A collated batch of samples.

    Attributes:
        images: uint8 tensor [B, 3, H, W].
        label_maps: int32 tensor [B, K, sh, sw] (K = max over the batch, padded with 0).
        image_labels: int32 tensor [B, J] (padded with 0).
        class_labels: int64 tensor [B].
        indices: int64 tensor [B], dataset indices of the samples.
        latents: float32 tensor [B, Z], the samples' latents (generated
            datasets), or None when the samples carry none.
    """

    images: torch.Tensor
    label_maps: torch.Tensor
    image_labels: torch.Tensor
    class_labels: torch.Tensor
    indices: torch.Tensor
    latents: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        images, label_maps, image_labels, class_labels, indices = (
            t.to(device, non_blocking=non_blocking)
            for t in (self.images, self.label_maps, self.image_labels, self.class_labels, self.indices)
        )
        return Batch(
            images,
            label_maps,
            image_labels,
            class_labels,
            indices,
            latents=None if self.latents is None else self.latents.to(device, non_blocking=non_blocking),
        )


class ConceptDataset(abc.ABC):
    """A dataset of images with concept masks (see module docstring).

    Subclasses set ``name``, ``image_size`` (H, W), ``mask_size`` (sh, sw),
    ``concepts`` (``concepts[i].number == i + 1``), ``categories`` and
    ``classes`` (scene class names, may be empty), and implement
    ``__len__`` and ``__getitem__``.
    """

    name: str = "dataset"
    image_size: tuple[int, int]
    mask_size: tuple[int, int]
    concepts: list[Concept]
    categories: list[str]
    classes: list[str] = []  # noqa: RUF012 (subclasses assign their own list)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> Sample: ...

    def _checked_index(self, index: int) -> int:
        """A sample index as a sequence reads it (negative counts from the end).

        Raises:
            IndexError: out of range.
        """
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return index

    def concept_names(self) -> list[str]:
        """Names indexed by concept number (index 0 is ``"-"``)."""
        return ["-"] + [c.name for c in self.concepts]


def collate_samples(samples: Sequence[tuple[int, Sample]]) -> Batch:
    """Collate ``(index, sample)`` pairs into a :class:`Batch` (pads K and J with 0).

    ``latents`` is stacked when the first sample carries a latent (then every
    sample must), else None.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    first = samples[0][1]
    sh, sw = first.label_maps.shape[1:] if first.label_maps.ndim == 3 and first.label_maps.shape[0] else (0, 0)
    for _, s in samples:
        if s.label_maps.ndim == 3 and s.label_maps.shape[0]:
            sh, sw = s.label_maps.shape[1:]
            break
    k = max(s.label_maps.shape[0] for _, s in samples)
    j = max(len(s.image_labels) for _, s in samples)
    b = len(samples)
    images = torch.from_numpy(np.stack([s.image for _, s in samples])).permute(0, 3, 1, 2).contiguous()
    maps = torch.zeros((b, k, sh, sw), dtype=torch.int32)
    labels = torch.zeros((b, j), dtype=torch.int32)
    for i, (_, s) in enumerate(samples):
        if s.label_maps.shape[0]:
            maps[i, : s.label_maps.shape[0]] = torch.from_numpy(np.asarray(s.label_maps, np.int32))
        if len(s.image_labels):
            labels[i, : len(s.image_labels)] = torch.from_numpy(np.asarray(s.image_labels, np.int32))
    latents = None
    if first.latent is not None:
        if any(s.latent is None for _, s in samples):
            raise ValueError("some samples of the batch carry a latent and some do not")
        latents = torch.from_numpy(np.stack([np.asarray(s.latent, np.float32) for _, s in samples]))
    return Batch(
        images=images,
        label_maps=maps,
        image_labels=labels,
        class_labels=torch.tensor([s.class_label for _, s in samples], dtype=torch.int64),
        indices=torch.tensor([i for i, _ in samples], dtype=torch.int64),
        latents=latents,
    )

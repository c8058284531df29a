"""A segmentation model as a concept source.

:class:`Segmenter` wraps any module that maps normalised images [B, 3, H, W] to
per-pixel class scores [B, L, h, w]: the label map is the per-pixel argmax, with
class 0 meaning background / no concept and classes 1..L-1 becoming concepts
1..L-1. Concepts are compared at the segmenter's output resolution (a quarter of
the image for the usual segmenters). Pass it to :func:`dissect_core.dissect.dissect`
as ``segmenter=`` to label images that carry no masks, or wrap a dataset with
:class:`SegmentedDataset`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .concepts import Concept, ConceptDataset, Sample, size_pair
from .models import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SegmentedDataset", "Segmenter"]


class Segmenter:
    """Per-pixel concept labels from a segmentation network.

    Args:
        module: maps float [B, 3, H, W] (normalised) to scores [B, L, h, w].
        labels: the L class names; ``labels[0]`` is background (not a concept).
        categories: one category for all concepts, or one per label (index 0 ignored).
        mean: normalisation mean (RGB, for [0, 1] images).
        std: normalisation std.
        input_size: (H, W) to resize images to first (default: as given).
        device: where to run the module (default: where the images are).

    Attributes:
        concepts: ``Concept(i, labels[i], category)`` for i in 1..L-1.
    """

    def __init__(
        self,
        module: nn.Module,
        labels: Sequence[str],
        *,
        categories: str | Sequence[str] = "object",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if len(labels) < 2:
            raise ValueError("a segmenter needs a background label and at least one concept label")
        cats = [categories] * len(labels) if isinstance(categories, str) else list(categories)
        if len(cats) != len(labels):
            raise ValueError(f"{len(cats)} categories for {len(labels)} labels")
        self.module = module.eval()
        self.labels = list(labels)
        self.concepts = [Concept(i, self.labels[i], cats[i]) for i in range(1, len(self.labels))]
        self.categories = list(dict.fromkeys(c.category for c in self.concepts))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.input_size = size_pair(input_size) if input_size is not None else None
        self.device = torch.device(device) if device is not None else None

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Label a batch.

        Args:
            images: uint8 tensor [B, 3, H, W] (RGB).

        Returns:
            int32 tensor [B, 1, h, w] of concept numbers (0 = background), on the
            images' device.
        """
        from .dissect import preprocess_images

        device = self.device or images.device
        size = self.input_size or size_pair(images.shape[-2:])
        x = preprocess_images(images.to(device), size, self.mean, self.std)
        self.module.to(device)
        with torch.no_grad():
            scores = self.module(x)
        if scores.dim() != 4 or scores.shape[1] != len(self.labels):
            raise ValueError(f"the segmenter returned {tuple(scores.shape)}, expected [B, {len(self.labels)}, h, w]")
        return scores.argmax(dim=1, keepdim=True).to(torch.int32).to(images.device)


class SegmentedDataset(ConceptDataset):
    """A dataset whose concept masks come from a segmenter (labelled one image at a time).

    Args:
        images: a dataset supplying the images (its own masks are ignored).
        segmenter: the concept source.
    """

    def __init__(self, images: ConceptDataset, segmenter: Segmenter) -> None:
        self.images = images
        self.segmenter = segmenter
        self.name = f"{images.name}+segmenter"
        self.image_size = size_pair(images.image_size)
        probe = segmenter.segment(torch.zeros((1, 3, *self.image_size), dtype=torch.uint8))
        self.mask_size = size_pair(probe.shape[-2:])
        self.concepts = list(segmenter.concepts)
        self.categories = list(segmenter.categories)
        self.classes = list(getattr(images, "classes", []))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        sample = self.images[index]
        image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)[None]
        labels = self.segmenter.segment(image)[0].cpu().numpy().astype(np.int32)
        return Sample(image=sample.image, label_maps=labels, class_label=sample.class_label, latent=sample.latent)

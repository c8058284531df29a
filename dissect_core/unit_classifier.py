"""A unit as an image classifier: a threshold on its peak activation.

The paper scores how well a single unit separates images that contain a concept
from images that do not, by thresholding the unit's peak (spatial max)
activation. Here the threshold is the best over every candidate (each distinct
peak value, an image being called positive when its peak is strictly above it),
scored by balanced accuracy ``(TPR + TNR) / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Unpack

import numpy as np
import torch

from .concepts import ConceptDataset
from .models import LoadedModel
from .options import RunOptions

__all__ = ["UnitClassifierResult", "concept_presence", "image_peaks", "unit_classifier"]


@dataclass
class UnitClassifierResult:
    """The best threshold of a unit's peak activation for one concept.

    Attributes:
        threshold: images with peak > threshold are called positive.
        balanced_accuracy: (TPR + TNR) / 2 at that threshold.
        true_positive_rate: recall on images with the concept.
        true_negative_rate: recall on images without it.
        positive_peaks: float64 [P], peaks of the images with the concept.
        negative_peaks: float64 [N], peaks of the images without it.
    """

    threshold: float
    balanced_accuracy: float
    true_positive_rate: float
    true_negative_rate: float
    positive_peaks: np.ndarray
    negative_peaks: np.ndarray


def unit_classifier(
    peaks: np.ndarray | torch.Tensor | Sequence[float], has_concept: np.ndarray | torch.Tensor | Sequence[bool]
) -> UnitClassifierResult:
    """Best balanced accuracy of a threshold on peak activations.

    Args:
        peaks: float [N], one unit's peak activation on each image.
        has_concept: bool [N], whether each image contains the concept.

    Returns:
        the :class:`UnitClassifierResult` (ties: the lowest threshold).

    Raises:
        ValueError: no images with, or none without, the concept.
    """
    x = np.asarray(torch.as_tensor(peaks).cpu().numpy(), dtype=np.float64).reshape(-1)
    y = np.asarray(torch.as_tensor(has_concept).cpu().numpy(), dtype=bool).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{x.shape[0]} peaks but {y.shape[0]} labels")
    pos, neg = np.sort(x[y]), np.sort(x[~y])
    if not len(pos) or not len(neg):
        raise ValueError("need images both with and without the concept")
    values = np.unique(x)
    candidates = np.concatenate([[np.nextafter(values[0], -np.inf)], values])
    tpr = 1.0 - np.searchsorted(pos, candidates, side="right") / len(pos)
    tnr = np.searchsorted(neg, candidates, side="right") / len(neg)
    score = (tpr + tnr) / 2
    best = int(np.argmax(score))
    return UnitClassifierResult(
        threshold=float(candidates[best]),
        balanced_accuracy=float(score[best]),
        true_positive_rate=float(tpr[best]),
        true_negative_rate=float(tnr[best]),
        positive_peaks=pos,
        negative_peaks=neg,
    )


def image_peaks(
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    **options: Unpack[RunOptions],
) -> dict[str, np.ndarray]:
    """Every image's peak activation for every unit.

    Args:
        model: the network.
        dataset: the images.
        layers: dotted layer names.
        **options: as for :func:`dissect_core.dissect.dissect` (phase
            ``"peaks"``); output rows follow ``indices``.

    Returns:
        layer -> float32 [N, U] peak (spatial max, native resolution) activations.
    """
    from .dissect import _forward_batches, _make_source

    src = _make_source(model, dataset, layers, None, options)
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in src.layers}
    for prepared in _forward_batches(src, phase="peaks"):
        for layer, a in prepared.acts.items():
            out[layer].append(a.amax(dim=(2, 3)).cpu().numpy())
    return {layer: np.concatenate(parts).astype(np.float32) for layer, parts in out.items()}


def concept_presence(dataset: ConceptDataset, *, indices: Sequence[int] | None = None) -> np.ndarray:
    """Which concepts each image contains (in any label map or as a whole-image label).

    Args:
        dataset: the concept dataset.
        indices: dataset indices (default: all), in output row order.

    Returns:
        bool [N, C + 1]; column c is concept number c (column 0 unused).
    """
    idx = range(len(dataset)) if indices is None else indices
    c1 = len(dataset.concepts) + 1
    rows = []
    for i in idx:
        sample = dataset[int(i)]
        row = np.zeros(c1, dtype=bool)
        row[np.asarray(sample.label_maps, dtype=np.int64).reshape(-1)] = True
        row[np.asarray(sample.image_labels, dtype=np.int64).reshape(-1)] = True
        row[0] = False
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, c1), dtype=bool)

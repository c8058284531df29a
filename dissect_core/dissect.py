"""The dissection engine: thresholds, unit x concept IoU and labels for whole layers.

:func:`dissect` runs the network once per image, stops after the deepest requested
layer, and records every requested layer from that same pass. Each layer's
native-resolution activations are kept, so the later passes read them back instead
of re-running the network: in memory up to ``_CACHE_MEMORY`` bytes (256 MiB), the
rest in a scratch file on disk (``cache_dir`` or a temporary directory, deleted
afterwards), so memory stays flat however many images there are:

1. forward: activations upsampled to the mask resolution feed a
   :class:`~dissect_core.quantile.QuantileSketch` per layer, whose floor rises
   as images come in (values surely below the threshold are only counted, and so
   are exact zeros, most values of a post-ReLU unit: all-zero maps are not even
   upsampled); the top images by peak activation, and the unit's maps on them,
   are kept; labels are cached. On the CPU the sketch runs inline after each
   batch; on a GPU on a second thread, overlapping the next batch's loading.
   The floor starts at a guess from the first batch (a high native quantile);
   the few units whose threshold turns out to lie below it are sketched again
   from the cache, with a floor that rises from bounds only.
2. (rarely) quantile: refinement passes for units whose threshold bracket is too
   crowded to collect in memory.
3. count: one pass that both finishes the exact thresholds and counts. Pixels
   above a unit's bracket are on, pixels below it are off, and the few pixels
   inside it are kept (value and concepts) until the exact hazen quantile is known.

Both the forward and the count pass upsample only the (image, unit) maps that can
hold a pixel above the level they look at: an upsampled pixel mixes at most four
native values with non-negative weights summing to at most 1 (zero padding
outside), so a map whose native maximum is at or below a level t >= 0 (with a
margin for float32 rounding) has no pixel above it. Within a map the same holds
row by row (a row of the result reads at most two native rows), and rows that
read only all-zero native rows are exact zeros. On the CPU only the kept rows are
upsampled: the row product runs on the whole map, the column product on the kept
rows alone (checked against whole maps the first time per shape). Nothing else
changes: the thresholds and counts are those of upsampling every map.

On the CPU the per-value work runs as fused loops compiled by numba
(:mod:`~dissect_core.fused`; the torch operations run on a GPU or with
``DISSECT_FUSED=0``): the sketch's histogram update, and, once the first batch has
checked that the loops' blends round as this machine's matrix products do, the
upsampling itself, made from the native maps for only the segments of rows that may
rise above the floor (the sketch) or the threshold (the count, which tallies each
on-pixel's block, cell and concepts as it is made). The same float32 values, the same
integer counts.

The same pieces serve distributed workers, one shard of images each::

    sketches = merge(quantile_pass(model, ds, layers, indices=shard) for shard in shards)
    thresholds = resolve_thresholds(sketches, 0.99, lambda brackets: merge(
        refine_pass(model, ds, layers, brackets, indices=shard) for shard in shards))
    counts = merge(count_pass(model, ds, layers, thresholds, indices=shard) for shard in shards)
    results = {layer: finalize(layer, thresholds[layer], counts[layer], ds.concepts) for layer in layers}

Merged shard counts equal a single run's exactly (the counts are integers).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import fused
from .allocator import keep_freed_memory, release_freed_memory
from .concepts import Concept, ConceptDataset, Sample, collate_samples, size_pair
from .counts import ConceptCounts, PixelLabels, TopActivations, prepare_labels
from .errors import DatasetError, DissectError, LayerError
from .evidence import DEFAULT_BLOCKS, DEFAULT_RESAMPLES, DEFAULT_SEED, LabelEvidence
from .models import LoadedModel, layout_from_output
from .nethook import get_module, trace
from .options import Run, RunOptions
from .progress import ProgressFn, check_stop
from .quantile import (
    QuantileBracket,
    QuantileRefiner,
    QuantileSketch,
    float_keys,
    hazen_ranks,
    keys_to_float,
)
from .upsample import interpolation_matrix, interpolation_matrix_numpy, upsample

__all__ = [
    "LayerResult",
    "ProgressFn",
    "UnitLabel",
    "count_pass",
    "dissect",
    "finalize",
    "preprocess_images",
    "quantile_pass",
    "refine_pass",
    "resize_note",
    "resolve_thresholds",
]

_CHUNK_ELEMENTS = 1 << 24
_MIN_MAPS = 64
# Cached activations and labels held in memory before the rest goes to disk (_Cache). The
# Broden-like benchmark's 57 MB written and read back from a file took about 0.15 s there.
_CACHE_MEMORY = 256 << 20
_SEGMENT_MIN = 16
_SEGMENTS_MIN = 4
_SKIP_MAPS = True
_OVERLAP_SKETCH_ON_CPU = False
_OVERLAP_SKETCH_ON_GPU = True  # False: inline there too (bench/profile_dissect.py, to see the sketch)
# The first floor's guess (_RisingFloorSketch): the first batch's native quantile at
# 1 - _GUESS_SPREAD * (1 - q), 0.95 for q = 0.99. On random-weight ViT-S (MLP hidden layer)
# and resnet18 (layer3, layer4) it lay at 0.81-0.88 of the threshold (median over units)
# and above it for 0-0.1% of units; at 0.97 for 4-27% (those units are sketched again).
_GUESS_SPREAD = 5.0
# After each batch a guessing floor also rises to the data so far at 1 - s * (1 - q) (0.98 for
# q = 0.99, upsampled values). ViT-S MLP, 500 scenes: s = 2 missed 88 of 1,536 units and took
# 12.5 + 0.7 s (main sketch + again); s = 3: 6 units, 14.1 s; s = 1.5: 350 units, 11.4 + 3.4 s.
_GUESS_SPREAD_SEEN = 2.0
_GUESS_MIN_ABOVE = 8  # native values per unit above a guessed level, at least, in its sample


@dataclass(frozen=True)
class UnitLabel:
    """The best concept of a unit.

    Attributes:
        unit: unit index.
        concept: concept name, ``"-"`` when the unit overlaps no concept.
        category: the concept's category (``""`` for none).
        iou: its IoU.
        number: concept number (0 for none).
    """

    unit: int
    concept: str
    category: str
    iou: float
    number: int


@dataclass
class LayerResult:
    """Everything dissection found about one layer.

    Attributes:
        layer: dotted layer name.
        quantile: the activation quantile of the thresholds.
        concepts: the dataset's concepts (column i of ``iou`` is ``concepts[i]``).
        thresholds: float64 [U], t_u.
        iou: float64 [U, C], dataset-level IoU of unit x concept.
        intersection: int64 [U, C], pixels where the unit is on and the concept present.
        act_area: int64 [U], pixels where the unit is on.
        concept_area: int64 [C], pixels where the concept is present.
        top_images: int64 [U, k], dataset indices of each unit's top images by
            peak (spatial max, native resolution) activation, best first.
        top_values: float32 [U, k], their peak activations.
        n_images: images dissected.
        n_pixels: mask pixels dissected (images x mask size).
        top_maps: float32 [U, k, h, w], each unit's native-resolution feature map
            on each of its top images (``top_maps[u, j]`` is on image
            ``top_images[u, j]``), or None when not kept; pictures of units are
            drawn from these without running the network again.
        evidence: each label's interval, stability, runner-up, chance level and
            p-value (:class:`~dissect_core.evidence.LabelEvidence`), or None.
    """

    layer: str
    quantile: float
    concepts: list[Concept]
    thresholds: np.ndarray
    iou: np.ndarray
    intersection: np.ndarray
    act_area: np.ndarray
    concept_area: np.ndarray
    top_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    top_values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    n_images: int = 0
    n_pixels: int = 0
    top_maps: np.ndarray | None = None
    evidence: LabelEvidence | None = None

    @property
    def units(self) -> int:
        """Number of units U."""
        return int(self.thresholds.shape[0])

    @property
    def labels(self) -> list[UnitLabel]:
        """Each unit's highest-IoU concept over all categories."""
        out = []
        for u in range(self.units):
            if self.iou.shape[1] == 0 or self.iou[u].max() <= 0:
                out.append(UnitLabel(u, "-", "", 0.0, 0))
                continue
            c = int(np.argmax(self.iou[u]))
            concept = self.concepts[c]
            out.append(UnitLabel(u, concept.name, concept.category, float(self.iou[u, c]), concept.number))
        return out

    def unit_rows(self) -> list[dict[str, Any]]:
        """One row per unit: unit, label, category, iou, threshold."""
        return [
            {
                "unit": lab.unit,
                "label": lab.concept,
                "category": lab.category,
                "iou": lab.iou,
                "threshold": float(self.thresholds[lab.unit]),
            }
            for lab in self.labels
        ]

    def iou_rows(self) -> Iterator[dict[str, Any]]:
        """One row per unit x concept pair: unit, concept, category, iou (unit-major order)."""
        for u in range(self.units):
            for c, concept in enumerate(self.concepts):
                yield {"unit": u, "concept": concept.name, "category": concept.category, "iou": float(self.iou[u, c])}

    def summary(self, min_iou: float = 0.04) -> dict[str, Any]:
        """Detector counts, as the paper reports them.

        Args:
            min_iou: a unit is a detector of its label when its IoU is at least this.

        Returns:
            dict with ``layer``, ``units``, ``detectors`` (count), ``unique_concepts``
            (distinct labels among detectors), ``detectors_by_category`` and
            ``unique_concepts_by_category`` (category -> count),
            ``concept_units`` (concept name -> number of detector units), and with
            evidence ``evidence`` (:meth:`~dissect_core.evidence.LabelEvidence.counts`).
        """
        detectors = [lab for lab in self.labels if lab.number and lab.iou >= min_iou]
        by_cat = Counter(lab.category for lab in detectors)
        unique: dict[str, set[str]] = {}
        for lab in detectors:
            unique.setdefault(lab.category, set()).add(lab.concept)
        return {
            "layer": self.layer,
            "units": self.units,
            "min_iou": min_iou,
            "detectors": len(detectors),
            "unique_concepts": len({lab.concept for lab in detectors}),
            "detectors_by_category": dict(by_cat),
            "unique_concepts_by_category": {k: len(v) for k, v in unique.items()},
            "concept_units": dict(Counter(lab.concept for lab in detectors)),
            **({"evidence": self.evidence.counts(min_iou=min_iou)} if self.evidence is not None else {}),
        }


class _Indexed(Dataset):
    def __init__(self, dataset: ConceptDataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Sample]:
        return self.indices[i], self.dataset[self.indices[i]]


def _dataset_indices(dataset: ConceptDataset, indices: Sequence[int] | None) -> list[int]:
    """The selected dataset indices (default: all), checked: at least one, each in range."""
    n = len(dataset)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    if not idx:
        raise DatasetError("the dataset (or the index selection) holds no images")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise DatasetError(f"image indices out of range 0..{n - 1}: {bad[:5]}")
    return idx


def preprocess_images(
    images: torch.Tensor,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 RGB images to the network's normalised input.

    Args:
        images: uint8 tensor [B, 3, H, W].
        input_size: (h, w) the network expects (bilinear, antialiased resize when different).
        mean: per-channel mean for [0, 1] images.
        std: per-channel std.

    Returns:
        float32 tensor [B, 3, h, w].
    """
    x = images.to(torch.float32).div_(255.0)
    if tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return x.sub_(m).div_(s)


def resize_note(model: LoadedModel, dataset: ConceptDataset) -> str | None:
    """One line saying that the dataset's images are resized to the model's input size, or None when
    they are fed as they are (the reference code feeds images as they are: labels can differ).

    Args:
        model: the network (a generator's images are its own: None).
        dataset: the images.
    """
    if model.latent_dim is not None:
        return None
    size = tuple(int(v) for v in getattr(dataset, "image_size", ()) or ())
    want = tuple(int(v) for v in model.input_size)
    if len(size) != 2 or size == want:
        return None
    return (
        f"images are {size[0]} x {size[1]} px; they are resized to the model's input size {want[0]} x {want[1]} "
        "before the forward pass (register or load the model with the input size it was trained at to "
        "change it)"
    )


@dataclass
class _Source:
    """The images and concepts one pass runs over, and how it runs."""

    model: LoadedModel
    dataset: ConceptDataset
    layers: list[str]
    indices: list[int]
    run: Run
    segmenter: Any
    concepts: list[Concept]
    mask_size: tuple[int, int] | None

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    @property
    def device(self) -> torch.device:
        return self.run.device


def _make_source(
    model: LoadedModel, dataset: ConceptDataset, layers: Sequence[str], segmenter: Any, options: RunOptions
) -> _Source:
    """Check a dissection pass's inputs; its batch size defaults to 32 images. Every pass
    starts here, and so sets the allocator to keep freed memory (:mod:`.allocator`)."""
    keep_freed_memory()
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise LayerError("no layers requested", valid=[])
    for layer in layers:
        get_module(model.module, layer)
    run = Run.of(options, batch_size=32)
    if run.batch_size < 1:
        raise DissectError(f"batch_size must be positive, got {run.batch_size}")
    idx = _dataset_indices(dataset, run.indices)
    concepts = list(segmenter.concepts) if segmenter is not None else list(dataset.concepts)
    for i, concept in enumerate(concepts):
        if concept.number != i + 1:
            raise DatasetError(f"concept {concept.name!r} has number {concept.number}, expected {i + 1}")
    mask = None if segmenter is not None else size_pair(dataset.mask_size)
    return _Source(model, dataset, layers, idx, run, segmenter, concepts, mask)


@dataclass
class _Prepared:
    indices: torch.Tensor
    acts: dict[str, torch.Tensor]
    label_maps: torch.Tensor
    image_labels: torch.Tensor


def _forward_batches(src: _Source, phase: str = "forward") -> Iterator[_Prepared]:
    """Run the network once per batch and yield every requested layer's activations.

    A generator (``model.kind == "generator"``) is fed the batch's latents instead
    of its preprocessed images; the images are the ones it generated from them.
    """
    loader = DataLoader(
        _Indexed(src.dataset, src.indices),
        batch_size=src.run.batch_size,
        shuffle=False,
        num_workers=src.run.num_workers,
        collate_fn=collate_samples,
        pin_memory=src.device.type == "cuda",
    )
    module = src.model.module.to(src.device)
    generator = src.model.kind == "generator"
    progress = src.run.progress
    total = len(src.indices)
    done = 0
    if progress:
        progress(phase, 0, total)
    for batch in loader:
        check_stop(src.run.should_stop, "dissection")
        batch = batch.to(src.device, non_blocking=True)
        if generator:
            if batch.latents is None:
                raise DatasetError("a generator is dissected on a generated dataset: the samples carry no latents")
            x = src.model.latent_input(batch.latents)
        else:
            x = preprocess_images(batch.images, src.model.input_size, src.model.mean, src.model.std)
        with torch.no_grad(), trace(module, src.layers, stop_after_last=True) as tr:
            tr(x)
            acts = {}
            for layer in src.layers:
                if layer not in tr.outputs:
                    raise LayerError(f"layer {layer!r} produced no output in this pass", layer=layer, valid=[])
                out = tr.outputs[layer]
                layout = layout_from_output(src.model, layer, out, x.shape[0])
                acts[layer] = layout.to_map(out).to(torch.float32).contiguous()  # token layouts are permuted views
            if src.segmenter is not None:
                label_maps = src.segmenter.segment(batch.images)
                image_labels = torch.zeros((label_maps.shape[0], 0), dtype=torch.int32, device=src.device)
            else:
                label_maps, image_labels = batch.label_maps, batch.image_labels
        if src.mask_size is None:
            src.mask_size = size_pair(label_maps.shape[-2:])
        if label_maps.shape[1] and tuple(label_maps.shape[-2:]) != src.mask_size:
            raise DatasetError(
                f"label maps are {tuple(label_maps.shape[-2:])}, the dataset's mask size is {src.mask_size}"
            )
        yield _Prepared(batch.indices, acts, label_maps, image_labels)
        done += batch.indices.shape[0]
        if progress:
            progress(phase, done, total)


def _upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The engine's one upsampling call: [M, h, w] -> [M, mh*mw].

    Every pass upsamples through here, so a map gets the same float32 values
    whichever other maps share the call (the whole batch, or only the maps a
    skip left over). Calls of fewer than ``_MIN_MAPS`` maps are padded with zero
    maps: BLAS libraries take other code paths for tiny products, and those may
    round differently.
    """
    m = maps.shape[0]
    if 0 < m < _MIN_MAPS and tuple(maps.shape[-2:]) != tuple(size):
        maps = torch.cat([maps, maps.new_zeros((_MIN_MAPS - m, *maps.shape[1:]))])
    return upsample(maps, size)[:m].reshape(m, -1)


def _chunks(a: torch.Tensor, mask_size: tuple[int, int]) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, upsampled [b, U, mh*mw]) pieces of a batch, each of bounded size."""
    b, u, h, w = a.shape
    per = max(1, _CHUNK_ELEMENTS // max(1, u * mask_size[0] * mask_size[1]))
    for start in range(0, b, per):
        part = a[start : start + per]
        yield start, _upsample_maps(part.reshape(-1, h, w), mask_size).view(part.shape[0], u, -1)


def _upsampled(batches: Iterable[_Prepared], src: _Source) -> Iterator[tuple[str, torch.Tensor]]:
    """(layer, upsampled [b, U, mh*mw]) pieces (:func:`_chunks`) of every layer of every batch."""
    for prepared in batches:
        assert src.mask_size is not None
        for layer, a in prepared.acts.items():
            for _, up in _chunks(a, src.mask_size):
                yield layer, up


def _pick(a: torch.Tensor, bi: torch.Tensor, ui: torch.Tensor) -> torch.Tensor:
    """``a[bi, ui]`` of a [B, U, h, w] batch, as one ``index_select``: [m, h, w]."""
    return a.reshape(-1, *a.shape[2:]).index_select(0, bi * a.shape[1] + ui)


class _MapUpsampler:
    """Upsamples chosen (image, unit) maps of a batch, one call per bounded chunk.

    The values are those of upsampling the whole batch (:func:`_chunks`): the
    first time a strict subset is asked for (per map shape, device and thread
    count, in this process), both are computed and compared, and on any
    difference (a BLAS whose rounding depends on the other rows) every later call
    upsamples the whole batch and picks the maps out of it.
    """

    _verdicts: ClassVar[dict[tuple[Any, ...], bool]] = {}
    _row_verdicts: ClassVar[dict[tuple[Any, ...], bool]] = {}
    _fused_modes: ClassVar[dict[tuple[Any, ...], tuple[bool, bool] | None]] = {}

    def __init__(self, mask_size: tuple[int, int]) -> None:
        self.mask_size = mask_size
        self.checked = False
        self.gather = True

    def _key(self, a: torch.Tensor) -> tuple[Any, ...]:
        return (tuple(a.shape[-2:]), tuple(self.mask_size), str(a.device), a.dtype, torch.get_num_threads())

    def rows(
        self, a: torch.Tensor, bi: torch.Tensor, ui: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images [m], units [m], native maps [m, h, w], upsampled maps [m, mh*mw]) chunks
        for the maps ``a[bi, ui]``."""
        if bi.numel() == 0:
            return
        whole = not self.gather
        if self.gather and not self.checked and bi.numel() < a.shape[0] * a.shape[1]:
            key = self._key(a)
            if key in self._verdicts:
                self.checked = True
                self.gather = self._verdicts[key]
                whole = not self.gather
            else:
                # Compare on the maps that lie in the batch's first chunk (bounded memory).
                first_start, first = next(_chunks(a, self.mask_size))
                inside = bi < first_start + first.shape[0]
                if bool(inside.any()):
                    b, u = bi[inside], ui[inside]
                    native = _pick(a, b, u)
                    rows = first[b - first_start, u]
                    self.checked = True
                    self._verdicts[key] = self.gather = torch.equal(_upsample_maps(native, self.mask_size), rows)
                    whole = not self.gather
                    yield b, u, native, rows
                    bi, ui = bi[~inside], ui[~inside]
                    if bi.numel() == 0:
                        return
                else:
                    whole = True  # nothing to compare yet: this batch upsampled whole
        if whole:
            for start, up in _chunks(a, self.mask_size):
                inside = (bi >= start) & (bi < start + up.shape[0])
                if bool(inside.any()):
                    b, u = bi[inside], ui[inside]
                    yield b, u, _pick(a, b, u), up[b - start, u]
            return
        per = max(_MIN_MAPS, _CHUNK_ELEMENTS // max(1, self.mask_size[0] * self.mask_size[1]))
        for start in range(0, bi.numel(), per):
            b, u = bi[start : start + per], ui[start : start + per]
            native = _pick(a, b, u)
            yield b, u, native, _upsample_maps(native, self.mask_size)

    def _rows_eligible(self, a: torch.Tensor) -> bool:
        """Whether only some rows of each map can be upsampled: on the CPU, when
        :func:`upsample` blends rows first (then row t of the result is row t of the
        first product times the column matrix, whatever the other rows)."""
        h, w = (int(v) for v in a.shape[-2:])
        th, tw = (int(v) for v in self.mask_size)
        return (
            a.device.type == "cpu"
            and (h, w) != (th, tw)
            and self.gather
            and th * h * w + th * w * tw <= h * w * tw + th * h * tw
        )

    def _upsample_rows(self, native: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (into the m * mh rows) of the upsampled maps [m, h, w]: [r, mw].

        The two products of :func:`upsample`, the second on the chosen rows only; both
        calls padded with zeros to at least ``_MIN_MAPS`` maps' worth, like
        :func:`_upsample_maps`.
        """
        m, h, w = native.shape
        th, tw = self.mask_size
        wh = interpolation_matrix(h, th, dtype=native.dtype, device=native.device)
        ww = interpolation_matrix(w, tw, dtype=native.dtype, device=native.device)
        if m < _MIN_MAPS:
            native = torch.cat([native, native.new_zeros((_MIN_MAPS - m, h, w))])
        sel = torch.matmul(wh, native).view(-1, w).index_select(0, idx)
        r = sel.shape[0]
        if r < _MIN_MAPS * th:
            sel = torch.cat([sel, sel.new_zeros((_MIN_MAPS * th - r, w))])
        return torch.matmul(sel, ww.t())[:r]

    def kept_rows(
        self,
        a: torch.Tensor,
        bi: torch.Tensor,
        ui: torch.Tensor,
        keep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        parts: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images [m], units [m], index [r] into the m * mh * parts row parts, values float32
        [r, mw / parts]) chunks of the maps ``a[bi, ui]``, with only the parts of rows (of
        equal width; ``parts=1``: whole rows) that ``keep(units, native maps)`` (bool
        [m, mh, parts]) marks.

        The rows hold the values of upsampling the whole batch. Where allowed
        (:meth:`_rows_eligible`) only the kept rows are computed; the first time per
        map shape, device and thread count they are compared with whole maps, and on
        any difference whole maps are upsampled from then on.
        """
        if bi.numel() == 0:
            return
        mw = self.mask_size[1]
        key = self._key(a)
        if self._rows_eligible(a) and self._verdicts.get(key) and self._row_verdicts.get(key, True):
            for b, u, native in self._chunks(bi, ui, a):
                kept = keep(u, native).reshape(native.shape[0], self.mask_size[0], parts)
                idx = kept.any(2).reshape(-1).nonzero().squeeze(1)
                rows = self._upsample_rows(native, idx)
                if key not in self._row_verdicts and idx.numel():
                    whole = _upsample_maps(native, self.mask_size).view(-1, mw).index_select(0, idx)
                    self._row_verdicts[key] = torch.equal(rows, whole)
                    rows = whole
                yield b, u, *_kept_parts(kept, idx, rows)
            return
        for b, u, native, up in self.rows(a, bi, ui):
            kept = keep(u, native).reshape(native.shape[0], self.mask_size[0], parts)
            idx = kept.any(2).reshape(-1).nonzero().squeeze(1)
            yield b, u, *_kept_parts(kept, idx, up.view(-1, mw).index_select(0, idx))

    def _chunks(
        self, bi: torch.Tensor, ui: torch.Tensor, a: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, units, native maps [m, h, w]) of the maps ``a[bi, ui]``, in chunks of
        bounded size once upsampled."""
        per = max(_MIN_MAPS, _CHUNK_ELEMENTS // max(1, self.mask_size[0] * self.mask_size[1]))
        for start in range(0, bi.numel(), per):
            b, u = bi[start : start + per], ui[start : start + per]
            yield b, u, _pick(a, b, u)

    def fused_chunks(
        self, a: torch.Tensor, bi: torch.Tensor, ui: torch.Tensor
    ) -> (
        tuple[Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], fused.Interpolation, tuple[bool, bool]] | None
    ):
        """(chunks as :meth:`_chunks`, the interpolation, the rounding mode) for the fused
        loops that make only the parts of rows they need from the native maps
        (:func:`~dissect_core.fused.sketch_parts`, :func:`~dissect_core.fused.count_parts`),
        or None where they do not apply: where only some rows may be upsampled
        (:meth:`_rows_eligible`, once the whole-batch comparison has been made) and the
        loops' blends give this machine's values (:meth:`_fused_mode`)."""
        key = self._key(a)
        if not (
            bi.numel()
            and self._rows_eligible(a)
            and self._verdicts.get(key)
            and self._row_verdicts.get(key, True)
            and fused.available(a)
            and a.dtype == torch.float32
        ):
            return None
        chunks = self._chunks(bi, ui, a)
        first = next(chunks)
        mode = self._fused_mode(a, first[2])
        if mode is None:
            return None
        return itertools.chain([first], chunks), self._interpolation(a), mode

    def _interpolation(self, a: torch.Tensor) -> fused.Interpolation:
        h, w = (int(v) for v in a.shape[-2:])
        return _fused_interpolation(h, w, int(self.mask_size[0]), int(self.mask_size[1]))

    def _fused_mode(self, a: torch.Tensor, native: torch.Tensor) -> tuple[bool, bool] | None:
        """How :func:`~dissect_core.fused.upsample_parts` reproduces :func:`_upsample_maps` for
        maps like ``a``'s, or None (then the matrix products run). Decided once per map
        shape, device and thread count, in this process: the rounding of each blend (fused
        multiply-adds or not, per product) that gives the same float32 values as the
        products on ``native`` (the first maps asked for) and on random maps of the same
        shape, with zeros and negative values; None if no rounding does. (For float32 maps
        on the CPU with the fused loops available: :meth:`fused_chunks` checks.)"""
        key = self._key(a)
        if key not in self._fused_modes:
            h, w = native.shape[-2:]
            generator = torch.Generator().manual_seed(0)
            synthetic = torch.randn((_MIN_MAPS, h, w), generator=generator) * 3.0
            synthetic = torch.where(synthetic < -1.0, torch.zeros_like(synthetic), synthetic)
            samples = [native[:_MIN_MAPS].contiguous(), synthetic]
            wants = [_upsample_maps(x, self.mask_size).view(-1, self.mask_size[1]) for x in samples]
            interp = self._interpolation(a)
            self._fused_modes[key] = next(
                (
                    mode
                    for mode in ((False, True), (True, True), (False, False), (True, False))
                    if all(
                        torch.equal(
                            fused.upsample_parts(
                                x, torch.ones((x.shape[0], self.mask_size[0], 1), dtype=torch.bool), interp, mode
                            ),
                            want,
                        )
                        for x, want in zip(samples, wants)
                    )
                ),
                None,
            )
        return self._fused_modes[key]


@functools.lru_cache(maxsize=16)
def _fused_interpolation(h: int, w: int, th: int, tw: int) -> fused.Interpolation:
    return fused.Interpolation(interpolation_matrix(h, th), interpolation_matrix(w, tw))


def _kept_parts(kept: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into the m * mh * parts row parts, values [r, mw / parts]) of the parts that
    ``kept`` (bool [m, mh, parts]) marks, from whole rows ``rows`` [k, mw] (rows ``idx``)."""
    parts = kept.shape[2]
    if parts == 1:
        return idx, rows
    flat = kept.reshape(-1, parts).index_select(0, idx).view(-1).nonzero().squeeze(1)
    values = rows.reshape(-1, rows.shape[1] // parts).index_select(0, flat)
    return idx.index_select(0, flat // parts) * parts + flat % parts, values


def _upsample_slack(device: torch.device) -> float:
    """Relative error allowance of one upsampling, as a fraction of the largest |input|.

    Two stages of at most two products each in float32: 2 * gamma_2 < 2**-21. When
    matmuls may run in reduced precision (TF32, bfloat16 passes), a generous 2**-5.
    """
    exact = torch.get_float32_matmul_precision() == "highest"
    if device.type == "cuda":
        exact = exact and not torch.backends.cuda.matmul.allow_tf32
    return 2.0**-21 if exact else 2.0**-5


def _cells(weights: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Cells of a 1-D interpolation matrix [T, S] (float64): groups of target pixels that read
    the same consecutive source pixels, with the same zero padding (weights summing to less
    than 1). Returns (first source pixel [R], last source pixel [R], padded bool [R], target
    pixels int64 [R]) on ``device``."""
    cells: Counter[tuple[int, int, bool]] = Counter()
    for row in weights:
        read = row.nonzero().squeeze(1).tolist()
        lo, hi = (read[0], read[-1]) if read else (0, 0)
        if read != list(range(lo, hi + 1)):
            raise AssertionError("interpolation reads non-consecutive source pixels")
        cells[(lo, hi, not read or float(row.sum()) < 1.0 - 2.0**-30)] += 1  # float64 sums: 1 or clearly less
    lo, hi, pad = zip(*cells)
    return (
        torch.tensor(lo, dtype=torch.int64, device=device),
        torch.tensor(hi, dtype=torch.int64, device=device),
        torch.tensor(pad, dtype=torch.bool, device=device),
        torch.tensor(list(cells.values()), dtype=torch.int64, device=device),
    )


class _MapBound:
    """An upper bound on every upsampled value of each (image, unit) feature map.

    An upsampled pixel mixes at most 4 native values with non-negative weights
    (zero padding outside the map), so it is at most ``S * max(max(a), 0)`` where
    S bounds the weight sums (<= 1 up to float32 rounding of the weights), plus
    float32 rounding: ``S * (max(max a, 0) + slack * max|a|)``. A map whose bound
    is <= t has no pixel > t and needs no upsampling. The bound is >= 0, so units
    with t < 0 are never skipped (padding blends toward 0, above such t).
    :meth:`rows` bounds each upsampled row the same way, from the native rows it
    reads.
    """

    def __init__(self, native: Sequence[int], size: tuple[int, int], device: torch.device) -> None:
        wh, ww = (interpolation_matrix(n, t).to(torch.float64) for n, t in zip(native, size))
        if tuple(native) == tuple(size):
            self.scale, self.slack = 1.0, 0.0
        else:
            self.scale = float(wh.sum(1).max()) * float(ww.sum(1).max()) * (1.0 + 2.0**-40)
            self.slack = _upsample_slack(device)
        self.row_weights = (wh.t() * float(ww.sum(1).max()) * (1.0 + 2.0**-40)).to(device)
        self.row_cells, self.col_cells = (
            _cells(torch.from_numpy(interpolation_matrix_numpy(n, t)), device) for n, t in zip(native, size)
        )
        # Segments of each upsampled row: spans of ``seg_width`` columns (a multiple of the
        # upsampling factor, at least _SEGMENT_MIN columns, dividing the row into at least
        # _SEGMENTS_MIN), each reading the native columns ``seg_ranges`` (G ranges); one
        # segment (the row) otherwise. Measured: 7 segments of 16 speed the sketch of a 7x7
        # layer at 112 px up by a third; 2 of 16 on 8x8 at 32 px gain nothing.
        tw, w = int(size[1]), int(native[1])
        width = tw
        if tw % w == 0 and tw > w:
            step = tw // w
            width = next((m for m in range(step, tw + 1, step) if m >= _SEGMENT_MIN and tw % m == 0), tw)
            if tw // width < _SEGMENTS_MIN:  # a few long segments gain less than they cost
                width = tw
        self.seg_width = width
        reads = (ww.view(tw // width, width, w) != 0).any(1)
        self.segments_count = reads.shape[0]
        # The native columns a segment reads are consecutive (two per target column).
        cols = [r.nonzero().squeeze(1).tolist() for r in reads]
        self.seg_ranges = [(c[0], c[-1] + 1) if c else (0, 0) for c in cols]
        if any(c != list(range(a, b)) for c, (a, b) in zip(cols, self.seg_ranges)):
            raise AssertionError("interpolation reads non-consecutive native columns")
        self._row_cells: tuple[np.ndarray, np.ndarray] | None = None

    def cell_lower(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower bounds of the upsampled values of a batch [B, U, h, w], by cells: float32
        [B, U, R * C], and int64 [R * C] the upsampled pixels of each cell.

        The upsampled pixels of a cell read the same native pixels (:func:`_cells`), with
        non-negative weights summing to 1, or to less (zero padding: then 0 is read too),
        so each is at least the smallest value read, less the rounding of the weights and
        of the two products (``2**-20`` of the values' magnitudes, and the upsampling
        slack); at least 0 in a map without negative values (as :meth:`both`).
        """
        (r_lo, r_hi, r_pad, r_count), (c_lo, c_hi, c_pad, c_count) = self.row_cells, self.col_cells
        rows = torch.minimum(a.index_select(2, r_lo), a.index_select(2, r_hi))
        low = torch.minimum(rows.index_select(3, c_lo), rows.index_select(3, c_hi))
        low = torch.where(r_pad[:, None] | c_pad[None, :], low.clamp(max=0), low).to(torch.float64)
        least = a.amin(dim=(2, 3))[:, :, None, None]
        mag = torch.maximum(a.amax(dim=(2, 3))[:, :, None, None].abs(), least.abs()).to(torch.float64)
        low = low - (low.abs() + mag) * 2.0**-20 - self.slack * mag
        low = torch.where(least >= 0, low.clamp(min=0), low)
        count = (r_count[:, None] * c_count[None, :]).reshape(-1)
        return _to_float32(low, up=False).reshape(a.shape[0], a.shape[1], -1), count

    def segments(self, maps: torch.Tensor, nonneg: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 [m, mh, G] upper bounds of each segment of each upsampled row of maps
        [m, h, w], and bool [m, mh, G]: the segments that are all exact zeros.

        As :meth:`rows`, with each native row's maxima taken over the native columns
        the segment reads only (a pixel of the segment reads a subset of them).
        ``nonneg``: the maps hold no negative value (spares the minima).
        """
        if self.segments_count == 1:
            bound, zero = self.rows_and_zeros(maps)
            return bound[:, :, None], zero[:, :, None]
        hi = torch.stack(
            [maps[:, :, a:b].amax(2) if b > a else maps.new_zeros(maps.shape[:2]) for a, b in self.seg_ranges], 2
        ).to(torch.float64)
        if nonneg:
            mag = hi
        else:
            lo = torch.stack(
                [maps[:, :, a:b].amin(2) if b > a else maps.new_zeros(maps.shape[:2]) for a, b in self.seg_ranges], 2
            ).to(torch.float64)
            mag = torch.maximum(hi.abs(), lo.abs())
        c = hi.clamp(min=0)
        if self.slack:
            c = c + self.slack * mag
        m, h, g = c.shape
        # One product over all (map, segment) pairs, then [m, mh, G] views of it.
        bound = (c.transpose(1, 2).reshape(m * g, h) @ self.row_weights).view(m, g, -1)
        if self.slack:
            return bound.transpose(1, 2), (bound == 0).transpose(1, 2)
        zero = (mag.transpose(1, 2).reshape(m * g, h) @ self.row_weights).view(m, g, -1) == 0
        return bound.transpose(1, 2), zero.transpose(1, 2)

    def fused_parts(self, interp: fused.Interpolation, mode: tuple[bool, bool]) -> fused.Parts:
        """The bounds of :meth:`segments` for the fused loops, by cells of upsampled rows
        (rows that read the same native rows): each cell's largest row weight sum (times the
        column weights' largest sum, as ``row_weights``), with a margin for the rounding of
        the float64 sums; with the segments, the interpolation and its rounding ``mode``."""
        if self._row_cells is None:
            weights = self.row_weights.cpu()
            reads = [tuple(weights[:, t].nonzero().squeeze(1).tolist()) for t in range(weights.shape[1])]
            starts = [t for t in range(len(reads)) if t == 0 or reads[t] != reads[t - 1]]
            ends = [*starts[1:], len(reads)]
            scale = [float(weights[:, t0:t1].sum(0).max()) * (1.0 + 2.0**-40) for t0, t1 in zip(starts, ends)]
            self._row_cells = (np.array([*starts, len(reads)]), np.array(scale))
        return fused.Parts(interp, mode, self.segments_count, *self._row_cells, self.slack)

    def rows(self, maps: torch.Tensor) -> torch.Tensor:
        """float64 [m, mh] upper bounds of each upsampled row of maps [m, h, w].

        Target row t reads native rows with weights ``wh[t]``, and each of its
        pixels at most ``S_w`` times the largest of those blends, so
        ``wh[t] @ (max(row max, 0) + slack * row max|a|) * S_w`` bounds it (the
        same rounding argument as for whole maps).
        """
        return self.rows_and_zeros(maps)[0]

    def rows_and_zeros(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`rows`, bool [m, mh]): the row bounds, and which upsampled rows are all
        exact zeros (every native row they read is all zeros: a sum of zero products)."""
        hi = maps.amax(dim=2).to(torch.float64)
        mag = torch.maximum(hi.abs(), maps.amin(dim=2).to(torch.float64).abs())
        c = hi.clamp(min=0)
        if self.slack:
            c = c + self.slack * mag
        bound = c @ self.row_weights
        # With slack, c == 0 exactly when the native row is all zeros, and a bound of 0 sums
        # only such rows (a positive c times a positive float64 weight stays positive).
        return bound, (bound == 0) if self.slack else ((mag @ self.row_weights) == 0)

    def __call__(self, a: torch.Tensor, peaks: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [B, U] upper bounds of a [B, U, h, w] batch (``peaks``: its spatial max, if known)."""
        return self.both(a, peaks, lower=False)[1]

    def both(
        self, a: torch.Tensor, peaks: torch.Tensor | None = None, lower: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(lower, upper) float64 [B, U] bounds of every upsampled value of each map.

        Below: 0 for a map without negative values (non-negative weights and
        inputs give non-negative results in any rounding), else
        ``S * (min(a) - slack * max|a|)``.
        """
        hi = (a.amax(dim=(2, 3)) if peaks is None else peaks).to(torch.float64)
        if not self.slack:
            lo = a.amin(dim=(2, 3)).to(torch.float64) if lower else None
            return lo, hi.clamp(min=0) * self.scale
        lo = a.amin(dim=(2, 3)).to(torch.float64)
        mag = torch.maximum(hi.abs(), lo.abs())
        upper = (hi.clamp(min=0) + self.slack * mag) * self.scale
        if not lower:
            return None, upper
        return torch.where(lo >= 0, torch.zeros_like(lo), (lo - self.slack * mag) * self.scale), upper


def _rows_above(row_bound: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """bool [m, mh]: the upsampled rows that may hold a value above their map's ``level``
    (float32 [m]); every other row lies wholly at or below it (``row_bound``: float64
    [m, mh] from :meth:`_MapBound.rows`)."""
    return ~(row_bound <= level.to(torch.float64)[:, None])


def _to_float32(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float64 -> float32 rounded outward (up: the nearest float32 >= x; else <= x); NaN stays NaN."""
    f = x.to(torch.float32)
    back = f.to(torch.float64)
    if up:
        return torch.where(back < x, torch.nextafter(f, torch.full_like(f, np.inf)), f)
    return torch.where(back > x, torch.nextafter(f, torch.full_like(f, -np.inf)), f)


class _RisingFloorSketch:
    """Pass 1 of :func:`dissect`: a :class:`QuantileSketch` whose floor rises as images stream in.

    The number of images, hence of values n, is known in advance, so the
    threshold's lower order statistic is the k-th largest value with
    ``k = n - lo_rank``. The k-th largest value seen so far is at most that, so
    the floor may rise to just below the sketch's bucket holding it
    (:meth:`QuantileSketch.raise_floor`); values at or below the floor are only
    counted. Maps whose :class:`_MapBound` is at or below the floor are not even
    upsampled. The bracket, and so the thresholds, are those of a plain sketch
    (which ``skip=False`` builds instead, upsampling every map).

    ``guess``: the first floor is a guess of the threshold instead, the first
    batch's native ``1 - _GUESS_SPREAD * (1 - quantile)`` quantile (the upsampled
    threshold usually lies above it: upsampling blends the highest native values
    with lower neighbours), and after each batch the floor also rises to the
    data so far at ``1 - _GUESS_SPREAD_SEEN * (1 - quantile)``. Guesses are not bounds:
    after the last batch, :meth:`missed` names the units whose threshold it
    overshot (their bracket lies at or below the floor), and
    :func:`_sketch_again` sketches those units again without it.
    """

    def __init__(
        self,
        units: int,
        native: Sequence[int],
        mask_size: tuple[int, int],
        quantile: float,
        n_images: int,
        device: torch.device,
        skip: bool | None = None,
        guess: bool = False,
    ) -> None:
        self.skip = _SKIP_MAPS if skip is None else skip
        floor = np.full(units, -np.inf, np.float32) if self.skip else None
        self.sketch = QuantileSketch(units, floor=floor, device=device)
        self.mask_size = mask_size
        n = n_images * mask_size[0] * mask_size[1]
        self.lo_rank = hazen_ranks(n, quantile)[0]
        self.k = n - self.lo_rank
        self.quantile = quantile
        self.guess_level = 1.0 - _GUESS_SPREAD * (1.0 - quantile) if guess else None
        self.guessed_first = False  # whether the first floor is a guess
        self.native_seen = 0  # native values per unit so far
        self.bound = _MapBound(native, mask_size, device)
        self.upsampler = _MapUpsampler(mask_size)

    def add(self, a: torch.Tensor, peaks: torch.Tensor) -> None:
        """Add a batch of native maps [B, U, h, w] (``peaks``: their spatial max [B, U])."""
        pixels = self.mask_size[0] * self.mask_size[1]
        self.native_seen += a.shape[0] * a.shape[2] * a.shape[3]
        lower, upper = self.bound.both(a, peaks) if self.skip else (None, None)
        if lower is not None and self.sketch.n == 0:
            self._first_floor(a, pixels)
        floor_now = self.sketch.floor  # None only without skip, hence without bounds
        if lower is None or upper is None or floor_now is None or bool(torch.isneginf(floor_now).all()):
            for _, up in _chunks(a, self.mask_size):
                self.sketch.add_batch(up)
            self._raise()
            return
        assert self.sketch.floor is not None
        floor = self.sketch.floor.to(a.device, torch.float64)
        # Maps wholly at or below the floor are only counted, all-zero maps above it (a floor
        # below 0) are counted as zeros; the rest are upsampled and their rows above it added.
        empty = (upper <= 0) & (lower >= 0)
        bi, ui = (~(upper <= floor[None, :]) & ~empty).nonzero(as_tuple=True)
        zeros: torch.Tensor | None = (empty & (floor[None, :] < 0)).sum(0) * pixels
        lo, hi = _to_float32(lower.amin(0), up=False), _to_float32(upper.amax(0), up=True)
        total = a.shape[0] * pixels
        first = self.sketch.n == 0
        nonneg = bool((lower >= 0).all())  # no map of the batch holds a negative value
        g = self.bound.segments_count
        for u, idx, rows, zero_count in self._parts(a, bi, ui, nonneg):
            zeros = zero_count if zeros is None else zeros + zero_count
            unit = u.index_select(0, idx // (self.mask_size[0] * g))
            self.sketch.add_rows(rows, unit, total=total, lower=lo, upper=hi, zeros=zeros)
            total, zeros = 0, None
            # In the first batch the floor also rises between chunks (later, a chunk moves
            # it little for the cost of a raise): the batch's values not given yet are
            # counted at the floor already, as if they were low, which can only lower the
            # k-th largest value the raise goes by (so it stays at or below the final one).
            # A guessed first floor lies higher than these raises reach.
            if first and not self.guessed_first:
                self._raise()
        if total:
            self.sketch.add_rows(a.new_zeros((0, pixels)), ui, total=total, lower=lo, upper=hi, zeros=zeros)
        self._raise()

    def _parts(
        self, a: torch.Tensor, bi: torch.Tensor, ui: torch.Tensor, nonneg: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(units [m], index [r] into the m * mh * G row segments, segments float32 [r,
        seg_width], int64 [U] values of segments of exact zeros left out) chunks of the maps
        ``a[bi, ui]``: the segments that may rise above the floor, but those of exact zeros
        (most of a post-ReLU unit's early batches, while its floor is still below 0), which
        are only counted. By the fused loop where it applies, else by :meth:`_MapBound.segments`
        and the upsampler."""
        g, seg_width, units = self.bound.segments_count, self.bound.seg_width, a.shape[1]
        assert self.sketch.floor is not None
        plan = self.upsampler.fused_chunks(a, bi, ui)
        if plan is not None:
            chunks, interp, mode = plan
            parts = self.bound.fused_parts(interp, mode)
            for _, u, native in chunks:
                rows, idx, zero_parts = fused.sketch_parts(native, self.sketch.floor.index_select(0, u), parts)
                zero_count = torch.zeros(units, dtype=torch.int64).index_add_(0, u, zero_parts) * seg_width
                yield u, idx, rows, zero_count
            return
        zero_counts: list[torch.Tensor] = []

        def keep(u: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
            assert self.sketch.floor is not None
            level = self.sketch.floor.to(u.device).index_select(0, u).to(torch.float64)[:, None, None]
            bound, zero = self.bound.segments(native, nonneg=nonneg)
            zero_count = torch.zeros(units, dtype=torch.int64, device=u.device)
            zero_counts.append(zero_count.index_add_(0, u, torch.count_nonzero(zero, dim=(1, 2))) * seg_width)
            return ~(bound <= level) & ~zero

        for _, u, idx, rows in self.upsampler.kept_rows(a, bi, ui, keep, parts=g):
            yield u, idx, rows, zero_counts.pop()

    def _first_floor(self, a: torch.Tensor, pixels: int) -> None:
        """Before any data, from the first batch's native maps [B, U, h, w]: a floor just below
        the largest value v of which this batch has at least k upsampled values >= v, by the
        lower bounds of its cells (:meth:`_MapBound.cell_lower`). The k-th largest value of
        all the data is at least that (the batch is part of it), so the floor starts where
        it would otherwise rise to only once a batch has been sketched. The bounds of maps
        without negative values are >= 0, so a unit with k such upsampled values gets a floor
        of at least just below 0: only its exact zeros are then counted rather than bucketed.

        With a guess (``guess_level``), the floor is the guess alone: it lies well above these
        bounds on every network measured, and where it overshoots, the unit is sketched again.
        The guess needs a level of at least 0.5 and a batch with at least ``_GUESS_MIN_ABOVE``
        native values per unit above it (not, say, a batch of 32 vectors at q = 0.99)."""
        assert self.sketch.floor is not None
        floor = self.sketch.floor.clone()
        values_per_unit = a.shape[0] * a.shape[2] * a.shape[3]
        guessing = (
            self.guess_level is not None
            and self.guess_level >= 0.5
            and (1.0 - self.guess_level) * values_per_unit >= _GUESS_MIN_ABOVE
        )
        if not guessing and a.shape[0] * pixels >= self.k and bool(torch.isfinite(a).all()):
            units = a.shape[1]
            step = max(1, _CHUNK_ELEMENTS // max(1, a.shape[0] * (a.shape[2] + 1) * (a.shape[3] + 1)))
            for start in range(0, units, step):
                low, count = self.bound.cell_lower(a[:, start : start + step])
                values = low.transpose(0, 1).reshape(low.shape[1], -1)  # [u, B * cells]
                values, order = values.sort(dim=1, descending=True)
                covered = torch.cumsum(count.repeat(a.shape[0])[order], dim=1)
                at = torch.searchsorted(covered, torch.full_like(covered[:, :1], self.k))
                v = values.gather(1, at)[:, 0]  # k upsampled values of this batch are >= v
                below = torch.nextafter(v, torch.full_like(v, -np.inf)).to(floor.device)
                floor[start : start + step] = torch.maximum(floor[start : start + step], below)
        if guessing and bool(torch.isfinite(a).all()):
            assert self.guess_level is not None
            self.guessed_first = True
            m = min(values_per_unit, max(1, math.ceil(self.guess_level * values_per_unit)))
            step = max(1, _CHUNK_ELEMENTS // max(1, values_per_unit))
            for start in range(0, a.shape[1], step):
                part = a[:, start : start + step].transpose(0, 1).reshape(-1, values_per_unit)
                g = part.kthvalue(m, dim=1).values
                below = torch.nextafter(g, torch.full_like(g, -np.inf)).to(floor.device)
                floor[start : start + step] = torch.maximum(floor[start : start + step], below)
        self.sketch.floor = floor

    def missed(self) -> torch.Tensor:
        """int64 [S]: after the last batch, the units whose lower order statistic lies at or
        below the floor (only a guessed floor can overshoot it; the other floors are bounds)."""
        if self.sketch.floor_count is None:
            return torch.zeros(0, dtype=torch.int64)
        return (self.sketch.floor_count > self.lo_rank).nonzero().squeeze(1).cpu()

    def _raise(self) -> None:
        if not self.skip:
            return
        n = self.sketch.n
        rank = n - self.k  # the k-th largest value so far: at most the final one
        spread = _GUESS_SPREAD_SEEN * (1.0 - self.quantile)
        if self.guess_level is not None and spread * self.native_seen >= _GUESS_MIN_ABOVE:
            # Guessing: also the value of the data so far at the quantile 1 - s * (1 - q)
            # (s = _GUESS_SPREAD_SEEN); higher than the bound in the first part of the data.
            rank = max(rank, n - max(1, math.ceil(spread * n)))
        if 0 <= rank < n:
            self.sketch.raise_floor(rank)


def _located(
    flat: torch.Tensor, idx: torch.Tensor, images: torch.Tensor, units: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, unit, mask pixel) of flat positions into kept rows [r, width], whose row k is
    row ``idx[k] % height`` of map ``idx[k] // height`` (of unit ``units[m]`` on ``images[m]``)."""
    row = idx.index_select(0, flat // width)
    m = row // height
    return images.index_select(0, m), units.index_select(0, m), (row % height) * width + flat % width


def _float32_below(values: np.ndarray) -> np.ndarray:
    """Largest float32 <= each float64 value (so ``a > result`` iff ``a > value`` for float32 a)."""
    f = np.asarray(values, dtype=np.float64).astype(np.float32)
    return np.where(f.astype(np.float64) > values, np.nextafter(f, np.float32(-np.inf)), f).astype(np.float32)


class _LayerCounter:
    """Counts one layer, finishing unresolved thresholds on the way (see module docstring).

    Pixels are looked at only where they may exceed ``cand`` (float32, at or below
    the threshold or its bracket). With ``skip`` (the default), :meth:`add_batch`
    upsamples only the (image, unit) maps whose :class:`_MapBound` exceeds
    ``cand``, and compares only their rows whose row bound does; the rest cannot
    hold such a pixel, so the counts are those of upsampling and comparing
    everything, which ``skip=False`` does.
    """

    def __init__(
        self,
        units: int,
        num_concepts: int,
        top_k: int,
        device: torch.device,
        thresholds: np.ndarray | None = None,
        bracket: QuantileBracket | None = None,
        skip: bool | None = None,
        blocks: int = DEFAULT_BLOCKS,
    ) -> None:
        self.counts = ConceptCounts(units, num_concepts, top_k=top_k, device=device, blocks=blocks)
        self.bracket = bracket
        self.thresholds = thresholds
        self.refiner: QuantileRefiner | None = None
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        if thresholds is not None:
            cand = _float32_below(thresholds)
            self.sure = None
        else:
            assert bracket is not None
            self.refiner = QuantileRefiner(bracket, max_values=np.iinfo(np.int64).max)
            lo_val = keys_to_float(bracket.key_lo[0]).astype(np.float32)
            resolved = bracket.resolved.all(axis=0)
            exact = _float32_below(bracket.estimate())
            cand = np.where(resolved, exact, np.nextafter(lo_val, np.float32(-np.inf))).astype(np.float32)
            sure = np.where(resolved, exact, keys_to_float(bracket.key_hi[1]).astype(np.float32))
            self.sure = torch.as_tensor(sure, device=device)
            self.collect_lo, self.collect_hi = (
                torch.as_tensor(v.astype(np.int64), device=device) for v in self.refiner.collect_ranges()
            )
        self.cand = torch.as_tensor(cand, device=device)
        self.skip = _SKIP_MAPS if skip is None else skip
        self.bound: _MapBound | None = None
        self.upsampler: _MapUpsampler | None = None
        self.cand64 = self.cand.to(torch.float64)

    def add(self, offset: int, up: torch.Tensor, labels: PixelLabels) -> None:
        """Count upsampled maps [b, U, P] that start at batch position ``offset``."""
        bi, ui, pi = (up > self.cand[None, :, None]).nonzero(as_tuple=True)
        self._add_on(bi + offset, ui, pi, up[bi, ui, pi] if self.sure is not None else None, labels)

    def add_batch(
        self, a: torch.Tensor, labels: PixelLabels, mask_size: tuple[int, int], peaks: torch.Tensor | None = None
    ) -> None:
        """Count a batch of native maps [B, U, h, w], upsampling only the maps that can hold
        a pixel above ``cand`` (see :class:`_MapBound`)."""
        if not self.skip:
            for offset, up in _chunks(a, mask_size):
                self.add(offset, up, labels)
            return
        if self.bound is None:
            self.bound = _MapBound(a.shape[-2:], mask_size, a.device)
            self.upsampler = _MapUpsampler(mask_size)
        assert self.upsampler is not None
        bi, ui = (~(self.bound(a, peaks) <= self.cand64[None, :])).nonzero(as_tuple=True)
        height = mask_size[0]
        bound = self.bound

        def keep(u: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
            return _rows_above(bound.rows(native), self.cand.index_select(0, u))

        fuse = fused.available(a, self.counts.block_act) and a.dtype in (torch.float32, torch.float64)
        if fuse:
            sure = self.sure if self.sure is not None else torch.full_like(self.cand, -torch.inf)
            block, cells = labels.blocks(self.counts.blocks), labels.cells()[0]
            pixel = labels.pixel.contiguous()
            plan = self.upsampler.fused_chunks(a, bi, ui)
            if plan is not None:
                # Only the segments of rows that may hold a pixel above cand are made, and
                # counted as they are made.
                chunks, interp, mode = plan
                parts = bound.fused_parts(interp, mode)

                def count(
                    chunk: tuple[torch.Tensor, torch.Tensor, torch.Tensor], act: torch.Tensor, inter: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
                    b, u, native = chunk
                    level, above = self.cand.index_select(0, u), sure.index_select(0, u)
                    return b, u, fused.count_parts(native, level, above, parts, b, u, pixel, block, cells, act, inter)

                # The chunks are dealt out to the CPU's threads, each with its own tallies; the
                # pixels left ambiguous are then added in the chunks' order.
                tallies = (self.counts.block_act, self.counts.block_intersection)
                for b, u, (m, p, v) in fused.split_tallies(count, chunks, tallies):
                    if m.numel():
                        self._add_ambiguous(b.index_select(0, m), u.index_select(0, m), p, v, labels)
                return
        for b, u, idx, rows in self.upsampler.kept_rows(a, bi, ui, keep):
            width = rows.shape[1]
            if fuse:
                # One loop over the rows counts every pixel above its threshold's sure side.
                rows = rows.contiguous()
                amb = fused.count_rows(
                    rows,
                    idx,
                    b,
                    u,
                    self.cand,
                    sure,
                    pixel,
                    block,
                    cells,
                    self.counts.block_act,
                    self.counts.block_intersection,
                )
                if amb.numel():
                    self._add_ambiguous(
                        *_located(amb, idx, b, u, height, width), rows.view(-1).index_select(0, amb), labels
                    )
                continue
            level = self.cand.index_select(0, u)
            flat = (rows > level.index_select(0, idx // height)[:, None]).view(-1).nonzero().squeeze(1)
            vals = rows.view(-1).index_select(0, flat) if self.sure is not None else None
            self._add_on(*_located(flat, idx, b, u, height, width), vals, labels)

    def _add_on(
        self, bi: torch.Tensor, ui: torch.Tensor, pi: torch.Tensor, vals: torch.Tensor | None, labels: PixelLabels
    ) -> None:
        """Count pixels above ``cand`` given as (image, unit, pixel) and, while thresholds are
        unresolved, their values."""
        if self.sure is None:
            self.counts.add_pixels(bi, ui, pi, labels)
            return
        assert vals is not None
        amb = vals <= self.sure.index_select(0, ui)
        if not bool(amb.any()):
            self.counts.add_pixels(bi, ui, pi, labels)
            return
        sure = (~amb).nonzero().squeeze(1)
        self.counts.add_pixels(bi.index_select(0, sure), ui.index_select(0, sure), pi.index_select(0, sure), labels)
        amb = amb.nonzero().squeeze(1)
        self._add_ambiguous(
            bi.index_select(0, amb), ui.index_select(0, amb), pi.index_select(0, amb), vals.index_select(0, amb), labels
        )

    def _add_ambiguous(
        self, ba: torch.Tensor, ua: torch.Tensor, pa: torch.Tensor, vals: torch.Tensor, labels: PixelLabels
    ) -> None:
        """Keep pixels above ``cand`` but not ``sure`` (their unit's threshold is not resolved
        yet) until :meth:`finish`, and collect their values for the refiner."""
        keys = float_keys(vals).to(torch.int64)
        rows = labels.rows(ba, pa)
        block = labels.blocks(self.counts.blocks).index_select(0, ba)
        cell = labels.cells()[0].index_select(0, pa)
        lo, hi = self.collect_lo[:, ua], self.collect_hi[:, ua]
        inside = ((keys >= lo) & (keys <= hi)).any(0)
        assert self.refiner is not None
        self.refiner.collected_units.append(ua[inside].to(torch.int32).cpu().numpy())
        self.refiner.collected_keys.append(keys[inside].to(torch.int32).cpu().numpy())
        self.pending.append(
            (ua.cpu().numpy(), keys.cpu().numpy(), rows.cpu().numpy(), block.cpu().numpy(), cell.cpu().numpy())
        )

    def finish(self) -> tuple[np.ndarray, ConceptCounts]:
        if self.thresholds is not None:
            return self.thresholds, self.counts
        assert self.refiner is not None
        bracket = self.refiner.bracket()
        thresholds = bracket.values()
        dev = self.counts.block_act.device
        for units, keys, rows, block, cell in self.pending:
            on = keys_to_float(keys).astype(np.float64) > thresholds[units]
            if on.any():
                unit_t, rows_t, block_t, cell_t = (
                    torch.as_tensor(x[on], device=dev) for x in (units, rows, block, cell)
                )
                self.counts.add_rows(unit_t, rows_t, block_t, cell_t)
        self.pending = []
        return thresholds, self.counts


class _Cache:
    """Per-layer activations plus per-batch labels, appended batch by batch and read back
    batch by batch: held in memory while they fit in ``_CACHE_MEMORY`` bytes, then in one
    file per layer and one of labels under ``root``. Reads return fresh arrays (the passes
    may change what they read)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.memory_left = _CACHE_MEMORY
        self.files: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.batches: list[tuple[int, np.ndarray]] = []
        self.offsets: dict[str, list[int]] = {}  # file offset per batch, -1 when held in memory
        self.held: dict[tuple[str, int], np.ndarray] = {}
        self.label_file: Any = None
        self.labels: list[tuple[int, np.dtype, tuple[int, ...], tuple[int, ...]]] = []
        self.held_labels: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _hold(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in memory (then counted as held)."""
        if nbytes > self.memory_left:
            return False
        self.memory_left -= nbytes
        return True

    def write(self, prepared: _Prepared) -> None:
        k = len(self.batches)
        b = int(prepared.indices.shape[0])
        for i, (layer, a) in enumerate(prepared.acts.items()):
            if layer not in self.shapes:
                self.shapes[layer] = tuple(a.shape[1:])
                self.offsets[layer] = []
            data = a.detach().to("cpu").contiguous().numpy()
            if self._hold(data.nbytes):
                self.held[(layer, k)] = data.copy()
                self.offsets[layer].append(-1)
                continue
            if layer not in self.files:
                self.files[layer] = open(self.root / f"layer{i}.f32", "w+b")
            f = self.files[layer]
            self.offsets[layer].append(f.tell())
            f.write(data.data.cast("B"))
        maps = prepared.label_maps.to("cpu")
        dtype = np.dtype(np.int16 if (maps.numel() == 0 or int(maps.max()) < 32767) else np.int32)
        maps_np = np.ascontiguousarray(maps.numpy().astype(dtype, copy=False))
        image_np = np.ascontiguousarray(prepared.image_labels.to("cpu").numpy().astype(np.int32, copy=False))
        if self._hold(maps_np.nbytes + image_np.nbytes):
            self.held_labels[k] = (maps_np.copy(), image_np.copy())
            self.labels.append((-1, dtype, maps_np.shape, image_np.shape))
        else:
            if self.label_file is None:
                self.label_file = open(self.root / "labels.bin", "w+b")
            self.labels.append((self.label_file.tell(), dtype, maps_np.shape, image_np.shape))
            self.label_file.write(maps_np.tobytes())
            self.label_file.write(image_np.tobytes())
        self.batches.append((b, prepared.indices.cpu().numpy()))

    def read(self, k: int, layer: str) -> np.ndarray:
        offset = self.offsets[layer][k]
        if offset < 0:
            return self.held[(layer, k)].copy()
        b = self.batches[k][0]
        u, h, w = self.shapes[layer]
        f = self.files[layer]
        f.seek(offset)
        data = np.fromfile(f, dtype=np.float32, count=b * u * h * w)
        return data.reshape(b, u, h, w)

    def read_labels(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        offset, dtype, maps_shape, image_shape = self.labels[k]
        if offset < 0:
            maps, image = self.held_labels[k]
            return maps.copy(), image.copy()
        f = self.label_file
        f.seek(offset)
        maps = np.fromfile(f, dtype=dtype, count=int(np.prod(maps_shape))).reshape(maps_shape)
        image = np.fromfile(f, dtype=np.int32, count=int(np.prod(image_shape))).reshape(image_shape)
        return maps, image

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}
        if self.label_file is not None:
            self.label_file.close()
            self.label_file = None
        self.held.clear()
        self.held_labels.clear()


def _cached_batches(cache: _Cache, layers: Sequence[str], run: Run, phase: str) -> Iterator[_Prepared]:
    device, progress = run.device, run.progress
    total = sum(b for b, _ in cache.batches)
    done = 0
    if progress:
        progress(phase, 0, total)
    for k, (b, idx) in enumerate(cache.batches):
        check_stop(run.should_stop, "dissection")
        acts = {}
        for layer in layers:
            t = torch.from_numpy(cache.read(k, layer))
            if device.type == "cuda":
                t = t.pin_memory()
            acts[layer] = t.to(device, non_blocking=True)
        maps, image = cache.read_labels(k)
        yield _Prepared(
            torch.from_numpy(idx),
            acts,
            torch.from_numpy(maps.astype(np.int32)).to(device, non_blocking=True),
            torch.from_numpy(image).to(device, non_blocking=True),
        )
        done += b
        if progress:
            progress(phase, done, total)


def _check_evidence(blocks: int, resamples: int) -> None:
    if not 1 <= int(blocks) <= 1024:
        raise DissectError(f"evidence blocks must be an integer from 1 to 1024, got {blocks}")
    if int(resamples) < 1:
        raise DissectError(f"resamples must be a positive integer, got {resamples}")


def _labels_of(src: _Source, prepared: _Prepared) -> PixelLabels:
    assert src.mask_size is not None
    return prepare_labels(
        prepared.label_maps,
        prepared.image_labels,
        src.num_concepts,
        size=src.mask_size,
        indices=prepared.indices.to(prepared.label_maps.device),
    )


def dissect(
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    *,
    quantile: float = 0.99,
    cache_dir: str | os.PathLike[str] | None = None,
    top_k_images: int = 5,
    segmenter: Any = None,
    max_collect: int = 1 << 23,
    evidence_blocks: int = DEFAULT_BLOCKS,
    resamples: int = DEFAULT_RESAMPLES,
    evidence_seed: int = DEFAULT_SEED,
    **options: Unpack[RunOptions],
) -> dict[str, LayerResult]:
    """Dissect layers of a network on a concept dataset (see module docstring).

    Args:
        model: the network and its input conventions.
        dataset: images with concept masks (or plain images with ``segmenter``).
        layers: dotted layer names; all are recorded from the same forward passes.
        quantile: the activation quantile that sets each unit's threshold.
        cache_dir: where to put the scratch activation files (a temporary
            directory inside it, removed afterwards; default: the system's). The first
            256 MiB of activations (``_CACHE_MEMORY``) stay in memory and never reach it.
        top_k_images: top-activating images kept per unit, with the unit's
            native maps on them (:attr:`LayerResult.top_maps`, U x k maps).
        segmenter: a :class:`~dissect_core.segmenter.Segmenter` that labels the
            images (its concepts replace the dataset's).
        max_collect: values a threshold-refinement pass may hold in memory.
        evidence_blocks, resamples, evidence_seed: how each label's evidence is
            computed (:mod:`~dissect_core.evidence`: blocks of images, bootstrap
            resamples, their seed); ``evidence_blocks=1`` computes none.
        **options: the :class:`~dissect_core.options.RunOptions` (``batch_size``
            default 32); ``progress`` reports images after every batch, in the
            phases ``"forward"``, ``"quantile"`` (only when a refinement pass is
            needed) and ``"count"``.

    Returns:
        layer name -> :class:`LayerResult`.

    Raises:
        LayerError: an unknown layer, or one whose output is not a feature map.
        DatasetError: a malformed dataset.
        Cancelled: should_stop returned True.
    """
    if not 0.0 <= quantile <= 1.0:
        raise DissectError(f"quantile must lie in [0, 1], got {quantile}")
    _check_evidence(evidence_blocks, resamples)
    src = _make_source(model, dataset, layers, segmenter, options)
    root = Path(tempfile.mkdtemp(prefix="dissect-", dir=cache_dir))
    cache = _Cache(root)
    try:
        sketches: dict[str, _RisingFloorSketch] = {}
        counters: dict[str, _LayerCounter] = {}
        top: dict[str, Any] = {}

        def absorb(prepared: _Prepared) -> None:
            cache.write(prepared)
            assert src.mask_size is not None
            for layer, a in prepared.acts.items():
                if layer not in sketches:
                    sketches[layer] = _RisingFloorSketch(
                        a.shape[1], a.shape[-2:], src.mask_size, quantile, len(src.indices), src.device, guess=True
                    )
                    top[layer] = TopActivations(a.shape[1], top_k_images) if top_k_images else None
                peaks = a.amax(dim=(2, 3))
                sketches[layer].add(a, peaks)
                if top[layer] is not None:
                    top[layer].add(peaks, prepared.indices.to(src.device), a)

        if not (_OVERLAP_SKETCH_ON_CPU if src.device.type == "cpu" else _OVERLAP_SKETCH_ON_GPU):
            # On the CPU the network and the sketch share the same cores: a second thread
            # only oversubscribes them (measured slower on 2 cores, bench/bench_dissect.py).
            for prepared in _forward_batches(src):
                absorb(prepared)
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dissect-sketch") as pool:
                pending: deque[Future[None]] = deque()
                try:
                    for prepared in _forward_batches(src):
                        pending.append(pool.submit(absorb, prepared))
                        while len(pending) > 1:
                            pending.popleft().result()
                    while pending:
                        pending.popleft().result()
                finally:
                    for future in pending:
                        future.cancel()
        if not all(s.sketch.finite for s in sketches.values()):
            raise DissectError("the network produced non-finite activations (inf or NaN) at a requested layer")
        brackets = {layer: s.sketch.bracket(quantile) for layer, s in sketches.items()}
        missed = {layer: s.missed() for layer, s in sketches.items()}
        sketches.clear()
        brackets.update(_sketch_again(cache, src, quantile, brackets, missed))
        while True:
            crowded = {
                layer: QuantileRefiner(b, max_values=max_collect)
                for layer, b in brackets.items()
                if not b.done and QuantileRefiner(b, max_values=max_collect).narrowing
            }
            if not crowded:
                break
            batches = _cached_batches(cache, list(crowded), src.run, "quantile")
            for layer, up in _upsampled(batches, src):
                crowded[layer].add_batch(up)
                release_freed_memory()  # its buffers vary in size: see dissect_core.allocator
            brackets.update({layer: r.bracket() for layer, r in crowded.items()})
        for layer in src.layers:
            units = cache.shapes[layer][0]
            b = brackets[layer]
            counters[layer] = _LayerCounter(
                units,
                src.num_concepts,
                0,
                src.device,
                thresholds=b.values() if b.done else None,
                bracket=b,
                blocks=evidence_blocks,
            )
        for prepared in _cached_batches(cache, src.layers, src.run, "count"):
            labels = _labels_of(src, prepared)
            assert src.mask_size is not None
            for layer, a in prepared.acts.items():
                counter = counters[layer]
                counter.counts.add_area(labels)
                counter.add_batch(a, labels, src.mask_size)
        results = {}
        for layer in src.layers:
            thresholds, counts = counters[layer].finish()
            counts.top = top[layer]
            results[layer] = finalize(
                layer, thresholds, counts, src.concepts, quantile=quantile, resamples=resamples, seed=evidence_seed
            )
        return results
    finally:
        cache.close()
        shutil.rmtree(root, ignore_errors=True)


def _sketch_again(
    cache: _Cache,
    src: _Source,
    quantile: float,
    brackets: dict[str, QuantileBracket],
    missed: dict[str, torch.Tensor],
) -> dict[str, QuantileBracket]:
    """The brackets of the layers with units whose guessed floor overshot their threshold
    (:meth:`_RisingFloorSketch.missed`): those units sketched again from the cache, with a
    floor that only rises from bounds, spliced into the layer's bracket."""
    todo = {layer: units for layer, units in missed.items() if units.numel()}
    if not todo:
        return {}
    assert src.mask_size is not None
    again: dict[str, _RisingFloorSketch] = {}
    for prepared in _cached_batches(cache, list(todo), src.run, "quantile"):
        for layer, a in prepared.acts.items():
            part = a.index_select(1, todo[layer].to(a.device))
            if layer not in again:
                again[layer] = _RisingFloorSketch(
                    part.shape[1], part.shape[-2:], src.mask_size, quantile, len(src.indices), src.device
                )
            again[layer].add(part, part.amax(dim=(2, 3)))
    return {
        layer: brackets[layer].with_units(todo[layer].numpy(), sketch.sketch.bracket(quantile))
        for layer, sketch in again.items()
    }


def quantile_pass(
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    *,
    segmenter: Any = None,
    **options: Unpack[RunOptions],
) -> dict[str, QuantileSketch]:
    """Pass 1 on one shard: a mergeable activation sketch per layer.

    Args:
        model, dataset, layers, segmenter: as for :func:`dissect`.
        **options: as for :func:`dissect` (phase ``"quantile"``); ``indices``
            are the shard's.

    Returns:
        layer -> :class:`QuantileSketch` of the upsampled activations (on the CPU).
    """
    src = _make_source(model, dataset, layers, segmenter, options)
    sketches: dict[str, QuantileSketch] = {}
    for layer, up in _upsampled(_forward_batches(src, phase="quantile"), src):
        if layer not in sketches:
            sketches[layer] = QuantileSketch(up.shape[1], device=src.device)
        sketches[layer].add_batch(up)
    return {layer: QuantileSketch.from_state_dict(s.state_dict()) for layer, s in sketches.items()}


def refine_pass(
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    brackets: dict[str, QuantileBracket],
    *,
    segmenter: Any = None,
    max_collect: int = 1 << 23,
    **options: Unpack[RunOptions],
) -> dict[str, QuantileRefiner]:
    """A threshold-refinement pass on one shard (see :func:`resolve_thresholds`).

    Args:
        brackets: layer -> the merged sketch's bracket (or a refined one); every
            shard must get the same brackets.
        max_collect: values the pass may collect (same on every shard).
        model, dataset, layers, segmenter, **options: as for :func:`quantile_pass`
            (phase ``"quantile"``).

    Returns:
        layer -> :class:`QuantileRefiner`; merge the shards' and call ``bracket()``.
    """
    todo = [layer for layer in layers if not brackets[layer].done]
    refiners = {layer: QuantileRefiner(brackets[layer], max_values=max_collect) for layer in todo}
    if not todo:
        return refiners
    src = _make_source(model, dataset, todo, segmenter, options)
    for layer, up in _upsampled(_forward_batches(src, phase="quantile"), src):
        refiners[layer].add_batch(up)
        release_freed_memory()  # its buffers vary in size: see dissect_core.allocator
    return refiners


def resolve_thresholds(
    sketches: dict[str, QuantileSketch],
    quantile: float,
    refine: Callable[[dict[str, QuantileBracket]], dict[str, QuantileRefiner]],
) -> dict[str, np.ndarray]:
    """Exact thresholds from merged sketches, running refinement passes as needed.

    Args:
        sketches: layer -> merged sketch over all images.
        quantile: the activation quantile.
        refine: runs :func:`refine_pass` over all shards for the given brackets
            and returns the merged refiners.

    Returns:
        layer -> float64 [U] thresholds (numpy hazen quantiles).
    """
    brackets = {layer: s.bracket(quantile) for layer, s in sketches.items()}
    while not all(b.done for b in brackets.values()):
        pending = {layer: b for layer, b in brackets.items() if not b.done}
        refined = refine(pending)
        brackets.update({layer: refined[layer].bracket() for layer in pending})
    return {layer: b.values() for layer, b in brackets.items()}


def count_pass(
    model: LoadedModel,
    dataset: ConceptDataset,
    layers: Sequence[str],
    thresholds: dict[str, np.ndarray | torch.Tensor],
    *,
    segmenter: Any = None,
    top_k_images: int = 5,
    evidence_blocks: int = DEFAULT_BLOCKS,
    **options: Unpack[RunOptions],
) -> dict[str, ConceptCounts]:
    """Pass 2 on one shard: unit x concept counts at given thresholds.

    Args:
        thresholds: layer -> float [U] thresholds (a pixel is on when a_u > t_u).
        top_k_images: top images per unit to keep, with their maps (merged across shards).
        evidence_blocks: as for :func:`dissect` (the same on every shard).
        model, dataset, layers, segmenter, **options: as for :func:`quantile_pass`
            (phase ``"count"``).

    Returns:
        layer -> :class:`ConceptCounts` (on the CPU; ``.top`` holds the top images).
    """
    _check_evidence(evidence_blocks, 1)
    src = _make_source(model, dataset, layers, segmenter, options)
    counters: dict[str, _LayerCounter] = {}
    for prepared in _forward_batches(src, phase="count"):
        labels = _labels_of(src, prepared)
        assert src.mask_size is not None
        for layer, a in prepared.acts.items():
            if layer not in counters:
                t = np.asarray(torch.as_tensor(thresholds[layer]).cpu().numpy(), dtype=np.float64)
                if t.shape != (a.shape[1],):
                    raise DissectError(f"layer {layer!r} has {a.shape[1]} units, got {t.shape} thresholds")
                counters[layer] = _LayerCounter(
                    a.shape[1], src.num_concepts, top_k_images, src.device, thresholds=t, blocks=evidence_blocks
                )
            counter = counters[layer]
            counter.counts.add_area(labels)
            peaks = a.amax(dim=(2, 3))
            if counter.counts.top is not None:
                counter.counts.top.add(peaks, prepared.indices.to(src.device), a)
            counter.add_batch(a, labels, src.mask_size, peaks)
    return {layer: ConceptCounts.from_state_dict(c.counts.state_dict()) for layer, c in counters.items()}


def finalize(
    layer: str,
    thresholds: np.ndarray | torch.Tensor,
    counts: ConceptCounts,
    concepts: Sequence[Concept],
    *,
    quantile: float = 0.99,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> LayerResult:
    """Turn merged counts into a :class:`LayerResult`.

    Args:
        layer: the layer name.
        thresholds: float [U].
        counts: the layer's counts over all images.
        concepts: the concepts (``concepts[i].number == i + 1``).
        quantile: the quantile the thresholds are at.
        resamples, seed: the label evidence's bootstrap (none when the counts have
            a single block).

    Returns:
        the result (IoU columns in ``concepts`` order).
    """
    t = np.asarray(torch.as_tensor(thresholds).cpu().numpy(), dtype=np.float64)
    if len(concepts) != counts.num_concepts:
        raise DissectError(f"{len(concepts)} concepts given, counts hold {counts.num_concepts}")
    iou = counts.iou()[:, 1:]
    top_images = np.zeros((counts.units, 0), np.int64)
    top_values = np.zeros((counts.units, 0), np.float32)
    top_maps = None
    if counts.top is not None:
        top_images = counts.top.indices.cpu().numpy()
        top_values = counts.top.values.cpu().numpy()
        if counts.top.maps is not None:
            top_maps = counts.top.maps.cpu().numpy()
    return LayerResult(
        layer=layer,
        quantile=float(quantile),
        concepts=list(concepts),
        thresholds=t,
        iou=iou,
        intersection=counts.intersection.cpu().numpy()[:, 1:],
        act_area=counts.act_area.cpu().numpy(),
        concept_area=counts.concept_area.cpu().numpy()[1:],
        top_images=top_images,
        top_values=top_values,
        n_images=counts.n_images,
        n_pixels=counts.n_pixels,
        top_maps=top_maps,
        evidence=counts.evidence(resamples=resamples, seed=seed) if counts.blocks > 1 else None,
    )

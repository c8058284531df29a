"""Unit ablation in a classifier: which units each class depends on (Bau et al. 2020, Fig. 2).

Removing a unit forces its whole feature map to 0; nothing is retrained.
Single-class accuracy is the balanced accuracy ``(recall + true-negative rate) / 2``
of "class c vs all others", where the network's prediction is its arg-max class
(as in the reference ``test_perclass_pra``). Units are ranked per class on the
training split by the balanced accuracy left after removing each unit alone
(lowest = most important); ties, which are common because most single removals
change no prediction, are broken by the mean drop of the class's logit margin
(logit of c minus the largest other logit) on the class's own images, larger drop
first, then by unit number. Sets of units are evaluated on the validation split.

Every evaluation runs the layer's prefix once per image: its outputs are cached
(in memory within ``memory_budget`` bytes, else in a scratch file), and each
chunk of B cached images is expanded to S x B rows, row block s with the units of
ablation s zeroed, and passed through the rest of the network only
(:func:`split_network`, found by :func:`dissect_core.surgery.split_module`).
Counts stream into :class:`AblationCounts`, which merge across image shards by
addition::

    removed = unit_ablations(num_units)                 # [1 + U, U]: none, then each unit alone
    counts = ablation_counts(model, train, "conv5", removed, indices=shard)
    importance = UnitImportance.from_counts("conv5", classes, np.arange(U), merged_counts)
    sets = ablate_sets(model, val, "conv5", importance)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, Unpack

import numpy as np
import torch

from .concepts import ConceptDataset, collate_samples
from .dissect import _dataset_indices, preprocess_images
from .errors import DatasetError, DissectError, LayerError
from .layouts import LayerLayout
from .models import LoadedModel, layout_from_output
from .nethook import evaluating, get_module, trace
from .options import Run, RunOptions, resolve_device
from .progress import check_stop
from .rankone import PLAN_ROWS, RankOnePlan, rank_one_plan
from .surgery import prefix, split_module

__all__ = [
    "DEFAULT_KS",
    "AblationCounts",
    "AblationOptions",
    "ClassAccuracy",
    "ImportanceInterpretability",
    "LayerSplit",
    "SetAblation",
    "UnitImportance",
    "ablate_sets",
    "ablation_counts",
    "all_class_accuracy",
    "balanced_accuracy",
    "class_accuracy",
    "class_predictions",
    "count_ties",
    "importance_interpretability",
    "rank_units",
    "set_ablations",
    "split_network",
    "unit_ablations",
    "unit_importance",
    "zero_units",
]

DEFAULT_KS: tuple[int, ...] = (1, 2, 3, 4, 5, 20, 64, 128, 256)

_MEMORY_BUDGET = 2 << 30
_CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}


class AblationOptions(RunOptions, total=False):
    """The keyword arguments of the ablation passes: every :class:`~dissect_core.options.RunOptions`, and these.

    The batch size defaults to 64 images, per forward pass and per ablation chunk.

    Attributes:
        memory_budget: bytes of cached layer output kept in memory (default 2 GiB).
        chunk_bytes: bytes of expanded layer output per suffix call (default 4 MiB
            on the CPU, where staying in cache pays, 256 MiB on a GPU).
        cache_dir: where the scratch file goes when the cache exceeds the budget
            (default: the system's temporary directory).
    """

    memory_budget: int
    chunk_bytes: int | None
    cache_dir: str | os.PathLike[str] | None


_ABLATION_KEYS = AblationOptions.__optional_keys__


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _image_batches(
    dataset: ConceptDataset, indices: list[int], run: Run
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(uint8 images [B, 3, H, W] on the run's device, class labels [B], dataset indices [B])."""
    from torch.utils.data import DataLoader, Dataset

    if run.batch_size < 1:
        raise DissectError(f"batch_size must be positive, got {run.batch_size}")
    device = run.device

    class _Rows(Dataset):
        def __len__(self) -> int:
            return len(indices)

        def __getitem__(self, i: int) -> Any:
            return indices[i], dataset[indices[i]]

    loader = DataLoader(
        _Rows(),
        batch_size=run.batch_size,
        shuffle=False,
        num_workers=run.num_workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
    )
    for batch in loader:
        yield (
            batch.images.to(device, non_blocking=True),
            batch.class_labels.to(device, non_blocking=True),
            batch.indices,
        )


def _check_hookable(model: LoadedModel) -> None:
    if isinstance(model.module, torch.jit.ScriptModule):
        raise DissectError(
            "unit ablation edits layer outputs with hooks, which TorchScript models do not run; "
            "register the model as an architecture with weights instead"
        )


def zero_units(units: Sequence[int] | torch.Tensor, layout: LayerLayout | None = None) -> Callable[[Any], Any]:
    """An edit callback for :func:`dissect_core.nethook.trace` that removes units.

    Args:
        units: unit indices to force to 0.
        layout: how the layer's output holds its units (default: a [B, U, ...] map); in a
            token layer the units are zeroed on the patch tokens only.

    Returns:
        ``f(output) -> copy of output with units `units` set to 0``.
    """
    idx = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long)

    def zero(maps: torch.Tensor) -> torch.Tensor:
        out = maps.clone()
        out[:, idx.to(out.device)] = 0
        return out

    return zero if layout is None else layout.edit(zero)


def class_predictions(
    model: LoadedModel,
    dataset: ConceptDataset,
    *,
    edit: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    **options: Unpack[RunOptions],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's class scores on every image, optionally with edited layers.

    Args:
        model: the classifier.
        dataset: images whose samples carry ``class_label``.
        edit: layer name -> output-editing callback (e.g. :func:`zero_units`).
        **options: the :class:`~dissect_core.options.RunOptions` (``batch_size``
            default 64); output rows follow ``indices``; ``progress("predict",
            done, total)`` counts images.

    Returns:
        (logits, labels): float32 [N, K] and int64 [N] (``-1`` where the image has
        no class), on the CPU.
    """
    if edit:
        _check_hookable(model)
    run = Run.of(options, batch_size=64)
    progress = run.progress
    idx = _dataset_indices(dataset, run.indices)
    module = model.module.to(run.device)
    logits, labels = [], []
    if progress:
        progress("predict", 0, len(idx))
    done = 0
    with torch.no_grad(), evaluating(module):
        for images, y, _ in _image_batches(dataset, idx, run):
            check_stop(run.should_stop, "ablation")
            x = preprocess_images(images, model.input_size, model.mean, model.std)
            if edit:
                with trace(module, [], edit=edit) as tr:
                    out = tr(x)
            else:
                out = module(x)
            logits.append(out.float().cpu())
            labels.append(y.cpu())
            done += y.shape[0]
            if progress:
                progress("predict", done, len(idx))
    return torch.cat(logits), torch.cat(labels).to(torch.int64)


def balanced_accuracy(pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, cls: int) -> float:
    """Single-class accuracy of "class cls vs all others".

    Args:
        pred: int [N], predicted classes.
        labels: int [N], true classes (rows with a negative label are ignored).
        cls: the class.

    Returns:
        ``(recall of cls + true-negative rate of not-cls) / 2``: recall is the share
        of images of ``cls`` predicted ``cls``, the true-negative rate the share of
        the other images not predicted ``cls``. NaN when there are no images of
        ``cls`` or none of other classes.
    """
    p, y = _as_numpy(pred).reshape(-1), _as_numpy(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predictions but {y.shape[0]} labels")
    keep = y >= 0
    p, y = p[keep], y[keep]
    pos = y == cls
    if not pos.any() or pos.all():
        return float("nan")
    recall = float(np.mean(p[pos] == cls))
    tnr = float(np.mean(p[~pos] != cls))
    return (recall + tnr) / 2


def all_class_accuracy(pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Share of images whose predicted class is their class.

    Args:
        pred: int [N], predicted classes.
        labels: int [N], true classes (rows with a negative label are ignored).

    Returns:
        the accuracy (NaN without labelled images).
    """
    p, y = _as_numpy(pred).reshape(-1), _as_numpy(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predictions but {y.shape[0]} labels")
    keep = y >= 0
    return float(np.mean(p[keep] == y[keep])) if keep.any() else float("nan")


@dataclass
class AblationCounts:
    """Prediction counts of a network under S ablations, over a stream of images.

    A streaming statistic: :meth:`add` batches, read out rates, :meth:`merge`
    shards of images (counts add), :meth:`state_dict` as plain arrays.

    Attributes:
        correct: int64 [S, K], images of class c predicted c under ablation s.
        predicted: int64 [S, K], images predicted c under ablation s.
        margin_sum: float64 [S, K], sum over images of class c of the logit margin
            (logit of c minus the largest other logit) under ablation s.
        class_counts: int64 [K], images of each class.
        n_images: labelled images counted.
    """

    correct: np.ndarray
    predicted: np.ndarray
    margin_sum: np.ndarray
    class_counts: np.ndarray
    n_images: int = 0

    @classmethod
    def empty(cls, ablations: int, num_classes: int) -> AblationCounts:
        """Zero counts.

        Args:
            ablations: S.
            num_classes: K.

        Returns:
            the empty statistic.
        """
        return cls(
            np.zeros((ablations, num_classes), np.int64),
            np.zeros((ablations, num_classes), np.int64),
            np.zeros((ablations, num_classes), np.float64),
            np.zeros(num_classes, np.int64),
            0,
        )

    @property
    def ablations(self) -> int:
        """S."""
        return int(self.correct.shape[0])

    @property
    def num_classes(self) -> int:
        """K."""
        return int(self.correct.shape[1])

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch.

        Args:
            logits: float [S, B, K], the scores of B images under each ablation.
            labels: int [B], their classes in 0..K-1.
        """
        if logits.shape[0] != self.ablations:
            raise DissectError(f"logits of {logits.shape[0]} ablations for counts of {self.ablations}")
        self._add_rows(logits, labels, 0)
        self._add_images(labels)

    def _add_images(self, labels: torch.Tensor) -> None:
        self.class_counts += np.bincount(labels.cpu().numpy(), minlength=self.num_classes)[: self.num_classes]
        self.n_images += int(labels.shape[0])

    def _add_rows(self, logits: torch.Tensor, labels: torch.Tensor, first: int) -> None:
        """Count predictions of ablations ``first .. first + G - 1`` ([G, B, K]); images are counted apart."""
        s, b, k = logits.shape
        if first + s > self.ablations or k != self.num_classes or labels.shape != (b,):
            raise DissectError(
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not fit "
                f"counts of {self.ablations} ablations x {self.num_classes} classes"
            )
        y = labels.to(logits.device, torch.long)
        pred = logits.argmax(dim=2)
        yy = y.unsqueeze(0).expand(s, b)
        correct = torch.zeros((s, k), dtype=torch.long, device=logits.device)
        correct.scatter_add_(1, yy, (pred == yy).long())
        predicted = torch.zeros((s, k), dtype=torch.long, device=logits.device)
        predicted.scatter_add_(1, pred, torch.ones_like(pred))
        own = logits.gather(2, yy.unsqueeze(2)).squeeze(2)
        others = logits.scatter(2, yy.unsqueeze(2), float("-inf")).amax(dim=2)
        margin = torch.zeros((s, k), dtype=torch.float64, device=logits.device)
        margin.scatter_add_(1, yy, (own - others).double())
        self.correct[first : first + s] += correct.cpu().numpy()
        self.predicted[first : first + s] += predicted.cpu().numpy()
        self.margin_sum[first : first + s] += margin.cpu().numpy()

    def merge(self, other: AblationCounts) -> AblationCounts:
        """Add another shard's counts (same ablations, other images) into this one.

        Args:
            other: counts of the same S ablations.

        Returns:
            self.
        """
        if self.correct.shape != other.correct.shape:
            raise DissectError(f"cannot merge counts of shape {other.correct.shape} into {self.correct.shape}")
        self.correct += other.correct
        self.predicted += other.predicted
        self.margin_sum += other.margin_sum
        self.class_counts += other.class_counts
        self.n_images += other.n_images
        return self

    def _negatives(self) -> np.ndarray:
        return self.n_images - self.class_counts

    def balanced_accuracy(self) -> np.ndarray:
        """Balanced single-class accuracy under each ablation.

        Computed as one integer numerator over ``2 * positives * negatives``, so two
        ablations with equal accuracy give bit-identical floats.

        Returns:
            float64 [S, K]; NaN for classes without images or without other images.
        """
        pos = self.class_counts[None, :]
        neg = self._negatives()[None, :]
        true_neg = neg - (self.predicted - self.correct)
        num = self.correct * neg + true_neg * pos
        den = 2 * pos * neg
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    def recall(self) -> np.ndarray:
        """float64 [S, K], share of images of class c predicted c (NaN without images)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.class_counts > 0, self.correct / np.maximum(self.class_counts, 1), np.nan)

    def true_negative_rate(self) -> np.ndarray:
        """float64 [S, K], share of images of other classes not predicted c."""
        neg = self._negatives()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(neg > 0, (neg - (self.predicted - self.correct)) / np.maximum(neg, 1), np.nan)

    def accuracy(self) -> np.ndarray:
        """float64 [S], all-class accuracy under each ablation."""
        return self.correct.sum(axis=1) / max(self.n_images, 1)

    def mean_margin(self) -> np.ndarray:
        """float64 [S, K], mean logit margin on the images of class c (NaN without images)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.class_counts > 0, self.margin_sum / np.maximum(self.class_counts, 1), np.nan)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The counts as plain arrays (see :meth:`from_state_dict`)."""
        return {
            "correct": self.correct.copy(),
            "predicted": self.predicted.copy(),
            "margin_sum": self.margin_sum.copy(),
            "class_counts": self.class_counts.copy(),
            "n_images": np.asarray(self.n_images, np.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AblationCounts:
        """Rebuild counts from :meth:`state_dict`.

        Args:
            state: the arrays.

        Returns:
            the counts.
        """
        return cls(
            np.asarray(state["correct"], np.int64).copy(),
            np.asarray(state["predicted"], np.int64).copy(),
            np.asarray(state["margin_sum"], np.float64).copy(),
            np.asarray(state["class_counts"], np.int64).copy(),
            int(np.asarray(state["n_images"])),
        )


@dataclass
class ClassAccuracy:
    """A network's accuracy on a split.

    Attributes:
        accuracy: all-class accuracy.
        balanced_accuracy: float64 [K], balanced accuracy of each class vs the rest.
        recall: float64 [K].
        true_negative_rate: float64 [K].
        class_counts: int64 [K], images of each class.
        n_images: labelled images.
    """

    accuracy: float
    balanced_accuracy: np.ndarray
    recall: np.ndarray
    true_negative_rate: np.ndarray
    class_counts: np.ndarray
    n_images: int

    @classmethod
    def from_counts(cls, counts: AblationCounts, row: int = 0) -> ClassAccuracy:
        """The accuracy under one ablation of a count table.

        Args:
            counts: the counts.
            row: the ablation (row 0 is "nothing removed" in this module's tables).

        Returns:
            the accuracy.
        """
        return cls(
            float(counts.accuracy()[row]),
            counts.balanced_accuracy()[row].copy(),
            counts.recall()[row].copy(),
            counts.true_negative_rate()[row].copy(),
            counts.class_counts.copy(),
            counts.n_images,
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (see :meth:`from_state_dict`)."""
        return {
            "accuracy": np.asarray(self.accuracy, np.float64),
            "balanced_accuracy": self.balanced_accuracy.copy(),
            "recall": self.recall.copy(),
            "true_negative_rate": self.true_negative_rate.copy(),
            "class_counts": self.class_counts.copy(),
            "n_images": np.asarray(self.n_images, np.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ClassAccuracy:
        """Rebuild from :meth:`state_dict`."""
        return cls(
            float(np.asarray(state["accuracy"])),
            np.asarray(state["balanced_accuracy"], np.float64),
            np.asarray(state["recall"], np.float64),
            np.asarray(state["true_negative_rate"], np.float64),
            np.asarray(state["class_counts"], np.int64),
            int(np.asarray(state["n_images"])),
        )


def class_accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> ClassAccuracy:
    """Baseline accuracy from class scores.

    Args:
        logits: float [N, K].
        labels: int [N] (rows with a negative label are ignored).

    Returns:
        the :class:`ClassAccuracy`.
    """
    scores = torch.as_tensor(_as_numpy(logits)).float()
    y = torch.as_tensor(_as_numpy(labels)).long()
    keep = y >= 0
    counts = AblationCounts.empty(1, int(scores.shape[1]))
    _check_labels(y[keep], counts.num_classes)
    counts.add(scores[keep].unsqueeze(0), y[keep])
    return ClassAccuracy.from_counts(counts)


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DatasetError(f"class label {int(labels.max())} does not fit a network with {num_classes} outputs")


@dataclass
class LayerSplit:
    """How the rest of a network runs from one layer's output.

    Attributes:
        layer: the dotted layer name.
        kind: ``"explicit"``: a module built from the network's stages after the
            layer (``nn.Sequential`` nesting, torchvision ResNet, VGG, AlexNet);
            ``"graph"``: cut out of the network's ``torch.fx`` graph (custom forwards
            such as ShuffleNet's, MobileNet's, DenseNet's); ``"hook"``: the whole
            network run on a zero input while the layer's output is replaced
            (correct, but recomputes everything before the layer); ``"full"``: the network is no function of the layer's output
            alone (a skip connection around it, or a layer that runs more than once),
            so every ablation runs the whole network on the images.
        suffix: maps the layer's raw output [R, ...] (e.g. [R, U, h, w]) to logits
            [R, K]; None for ``"full"``.
        shape: the layer's raw output per image at the model's input size ((U, h, w)
            for a feature map, (N, U) for transformer tokens, (U,) for a vector).
        num_classes: K.
        layout: how the output is laid out as unit maps (:mod:`dissect_core.layouts`):
            which dimension holds the units, and which tokens are left as they are.
        plan: how single-unit removals run as rank-one updates of the suffix's first
            linear operations (:mod:`dissect_core.rankone`); None where the suffix has
            no such structure (every ablation then runs the suffix on zeroed maps).
    """

    layer: str
    kind: str
    suffix: Callable[[torch.Tensor], torch.Tensor] | None
    shape: tuple[int, ...]
    num_classes: int
    layout: LayerLayout
    plan: RankOnePlan | None = None

    @property
    def units(self) -> int:
        """U, the layer's units."""
        return self.layout.units


def split_network(model: LoadedModel, layer: str, *, device: torch.device | str | None = None) -> LayerSplit:
    """Find how to run the network from one layer's output to its logits.

    :func:`dissect_core.surgery.split_module` on a random probe batch [2, 3, H, W]:
    each candidate is checked against the full forward pass and the first that
    reproduces it is used (explicit, then hook), else ``"full"``.

    Args:
        model: the classifier (not TorchScript).
        layer: dotted layer name.
        device: where the probe runs (the module is moved there).

    Returns:
        the :class:`LayerSplit`.

    Raises:
        LayerError: unknown layer, or its output is not a [B, U, h, w] tensor.
        DissectError: a TorchScript model.
    """
    _check_hookable(model)
    module = model.module
    get_module(module, layer)
    dev = resolve_device(device)
    module.to(dev)
    h, w = model.input_size
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn((2, 3, h, w), generator=gen).to(dev)

    def check(a: Any, full: Any) -> None:
        if not isinstance(a, torch.Tensor):
            raise LayerError(
                f"layer {layer!r} outputs a {type(a).__name__}, not a tensor: ablate a layer whose output is one "
                "tensor (e.g. the block around it)",
                layer=layer,
                valid=[],
            )
        layout_from_output(model, layer, a, a.shape[0])
        if not isinstance(full, torch.Tensor) or full.dim() != 2:
            raise DissectError(
                f"the network outputs {getattr(full, 'shape', type(full).__name__)}, not class scores [B, K]"
            )

    split = split_module(module, layer, probe, ways=("explicit", "graph", "hook"), check=check)
    shape = tuple(int(v) for v in split.activation.shape[1:])
    layout = layout_from_output(model, layer, split.activation, split.activation.shape[0])
    with evaluating(module):
        plan = rank_one_plan(split.suffix, split.activation, layout) if split.kind != "full" else None
    return LayerSplit(layer, split.kind, split.suffix, shape, int(split.output.shape[1]), layout, plan)


def unit_ablations(num_units: int, units: Sequence[int] | None = None) -> torch.Tensor:
    """The ablation table of single-unit importance.

    Args:
        num_units: U, the layer's units.
        units: the units to remove one at a time (default: all).

    Returns:
        bool [1 + U', U]: row 0 removes nothing, row 1 + i removes ``units[i]`` alone.
    """
    chosen = list(range(num_units)) if units is None else [int(u) for u in units]
    if any(not 0 <= u < num_units for u in chosen):
        bad = [u for u in chosen if not 0 <= u < num_units]
        raise DissectError(f"units out of range 0..{num_units - 1}: {bad[:5]}")
    removed = torch.zeros((1 + len(chosen), num_units), dtype=torch.bool)
    removed[torch.arange(1, 1 + len(chosen)), torch.tensor(chosen, dtype=torch.long)] = True
    return removed


class _ActivationCache:
    """The layer's outputs of N images: in memory (on the device) within a budget, else a scratch file."""

    def __init__(
        self,
        n: int,
        shape: tuple[int, ...],
        device: torch.device,
        memory_budget: int,
        cache_dir: str | os.PathLike[str] | None,
    ) -> None:
        self.device = device
        self.shape = shape
        self.n = 0
        self.labels = torch.empty(n, dtype=torch.long)
        nbytes = n * int(np.prod(shape)) * 4
        self.root: Path | None = None
        self.memory: torch.Tensor | None = None
        self.disk: np.memmap | None = None
        if nbytes <= memory_budget:
            self.memory = torch.empty((n, *shape), dtype=torch.float32, device=device)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="ablation-", dir=cache_dir))
            self.disk = np.lib.format.open_memmap(
                self.root / "acts.npy", mode="w+", dtype=np.float32, shape=(n, *shape)
            )

    def append(self, a: torch.Tensor, labels: torch.Tensor) -> None:
        b = a.shape[0]
        if self.memory is not None:
            self.memory[self.n : self.n + b] = a
        else:
            assert self.disk is not None
            self.disk[self.n : self.n + b] = a.float().cpu().numpy()
        self.labels[self.n : self.n + b] = labels.cpu()
        self.n += b

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.memory is not None:
            return self.memory[start:stop]
        assert self.disk is not None
        return torch.from_numpy(np.ascontiguousarray(self.disk[start:stop])).to(self.device)

    def close(self) -> None:
        self.memory = None
        self.disk = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def _ablated(a: torch.Tensor, removed: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    """Raw outputs [B, ...] and bool [G, U] -> [G * B, ...], block g with units ``removed[g]`` zeroed (a new
    tensor; prefix tokens of a token layer are left as they are)."""
    g = removed.shape[0]
    keep = layout.keep_mask(~removed, a.shape)
    out = torch.where(keep, a.unsqueeze(0), torch.zeros((), dtype=a.dtype, device=a.device))
    return out.reshape(g * a.shape[0], *a.shape[1:])


def _segments(rem: torch.Tensor, planned: bool) -> list[tuple[int, int, torch.Tensor | None]]:
    """Runs of ablation rows [first, stop): with the unit each removes (int [stop - first],
    ``-1`` for none) where every row removes at most one unit and a rank-one plan exists, else None."""
    if not planned:
        return [(0, rem.shape[0], None)]
    n = rem.sum(dim=1).cpu()
    unit = torch.where(n == 0, -1, rem.to(torch.int8).argmax(dim=1).cpu())
    single = (n <= 1).tolist()
    out: list[tuple[int, int, torch.Tensor | None]] = []
    first = 0
    for i in range(1, len(single) + 1):
        if i == len(single) or single[i] != single[first]:
            out.append((first, i, unit[first:i].clone() if single[first] else None))
            first = i
    return out


def _group_size(images: int, row_bytes: int, chunk_bytes: int, ablations: int) -> int:
    return int(max(1, min(ablations, chunk_bytes // max(1, row_bytes * images))))


def ablation_counts(
    model: LoadedModel,
    dataset: ConceptDataset,
    layer: str,
    removed: torch.Tensor | np.ndarray,
    *,
    split: LayerSplit | None = None,
    **options: Unpack[AblationOptions],
) -> AblationCounts:
    """Prediction counts of the network under many ablations of one layer.

    The layer's prefix runs once per image and its outputs are cached (in memory
    on the device up to ``memory_budget`` bytes, else in a scratch file under
    ``cache_dir``, deleted afterwards); then for each chunk of ``batch_size``
    cached images, groups of G ablations are expanded to G x B rows (about
    ``chunk_bytes`` of layer output at a time) and only the rest of the network
    runs (:func:`split_network`). When the network is no function of the layer's
    output alone, up to ``batch_size`` expanded rows at a time run through the
    whole network with the same zeroing done by a hook. Images without a class
    are skipped.

    Args:
        model: the classifier (not TorchScript).
        dataset: the images, with ``class_label``.
        layer: dotted layer name.
        removed: bool [S, U], ``removed[s, u]``: ablation s zeroes unit u.
        split: a :class:`LayerSplit` from :func:`split_network`, to reuse.
        **options: the :class:`AblationOptions`; shards of images (``indices``)
            merge with :meth:`AblationCounts.merge`; ``progress(phase, done,
            total)`` with phase ``"cache"`` (images) and ``"ablate"`` (image x
            ablation evaluations); ``should_stop`` is polled between chunks.

    Returns:
        the :class:`AblationCounts` of the S ablations.

    Raises:
        LayerError: unknown layer or not a feature map.
        DatasetError: no labelled image, or a label the network has no output for.
        DissectError: a TorchScript model, or ``removed`` of the wrong width.
    """
    run = Run.of(options, batch_size=64, also=_ABLATION_KEYS)
    dev, batch_size, progress = run.device, run.batch_size, run.progress
    split = split if split is not None else split_network(model, layer, device=dev)
    rem = torch.as_tensor(_as_numpy(removed)).to(torch.bool)
    units = split.units
    if rem.dim() != 2 or rem.shape[1] != units:
        raise DissectError(f"removed must be a bool [S, {units}] table for layer {layer!r}, got {tuple(rem.shape)}")
    rem = rem.to(dev)
    idx = _dataset_indices(dataset, run.indices)
    chunk_bytes = options.get("chunk_bytes")
    if chunk_bytes is None:
        chunk_bytes = _CHUNK_BYTES.get(dev.type, _CHUNK_BYTES["cuda"])
    counts = AblationCounts.empty(rem.shape[0], split.num_classes)
    row_bytes = int(np.prod(split.shape)) * 4
    module = model.module.to(dev)
    with torch.no_grad(), evaluating(module):
        if split.kind == "full":
            _count_full(model, dataset, split, rem, idx, counts, run, row_bytes, chunk_bytes)
        else:
            assert split.suffix is not None
            memory_budget = options.get("memory_budget", _MEMORY_BUDGET)
            cache = _ActivationCache(len(idx), split.shape, dev, memory_budget, options.get("cache_dir"))
            try:
                _fill_cache(model, dataset, layer, idx, cache, run)
                if cache.n == 0:
                    raise DatasetError("no image of the selection has a class label")
                _check_labels(cache.labels[: cache.n], split.num_classes)
                total = cache.n * rem.shape[0]
                done = 0
                if progress:
                    progress("ablate", 0, total)
                segments = _segments(rem, split.plan is not None)
                for start in range(0, cache.n, batch_size):
                    a = cache.read(start, min(cache.n, start + batch_size))
                    y = cache.labels[start : start + a.shape[0]].to(dev)
                    g = _group_size(a.shape[0], row_bytes, chunk_bytes, rem.shape[0])
                    bound = split.plan.bind(a) if split.plan is not None else None
                    g_plan = max(g, -(-PLAN_ROWS // a.shape[0]))
                    for first, stop, single in segments:
                        step = g if single is None else g_plan
                        for s0 in range(first, stop, step):
                            check_stop(run.should_stop, "ablation")
                            s1 = min(stop, s0 + step)
                            if single is not None:
                                assert bound is not None
                                out = bound(single[s0 - first : s1 - first])
                            else:
                                out = split.suffix(_ablated(a, rem[s0:s1], split.layout))
                            counts._add_rows(out.float().view(s1 - s0, a.shape[0], -1), y, s0)
                            done += (s1 - s0) * a.shape[0]
                            if progress:
                                progress("ablate", done, total)
                    counts._add_images(y)
            finally:
                cache.close()
    return counts


def _fill_cache(
    model: LoadedModel,
    dataset: ConceptDataset,
    layer: str,
    idx: list[int],
    cache: _ActivationCache,
    run: Run,
) -> None:
    progress = run.progress
    if progress:
        progress("cache", 0, len(idx))
    done = 0
    for images, y, _ in _image_batches(dataset, idx, run):
        check_stop(run.should_stop, "ablation")
        keep = y >= 0
        if keep.any():
            x = preprocess_images(images[keep], model.input_size, model.mean, model.std)
            cache.append(prefix(model.module, layer, x).float(), y[keep])
        done += y.shape[0]
        if progress:
            progress("cache", done, len(idx))


def _count_full(
    model: LoadedModel,
    dataset: ConceptDataset,
    split: LayerSplit,
    rem: torch.Tensor,
    idx: list[int],
    counts: AblationCounts,
    run: Run,
    row_bytes: int,
    chunk_bytes: int,
) -> None:
    progress = run.progress
    total = len(idx) * rem.shape[0]
    done = 0
    if progress:
        progress("ablate", 0, total)
    seen = 0
    for images, y, _ in _image_batches(dataset, idx, run):
        keep = y >= 0
        b_all = y.shape[0]
        if keep.any():
            y = y[keep]
            _check_labels(y, counts.num_classes)
            x = preprocess_images(images[keep], model.input_size, model.mean, model.std)
            b = x.shape[0]
            g = max(1, min(rem.shape[0], run.batch_size // b, _group_size(b, row_bytes, chunk_bytes, rem.shape[0])))
            for s0 in range(0, rem.shape[0], g):
                check_stop(run.should_stop, "ablation")
                group = rem[s0 : s0 + g]

                def edit(out: torch.Tensor, group: torch.Tensor = group) -> torch.Tensor:
                    return _zero_blocks(out, group, split.layout)

                with trace(model.module, [], edit={split.layer: edit}) as tr:
                    out = tr(x.repeat(group.shape[0], 1, 1, 1))
                counts._add_rows(out.float().view(group.shape[0], b, -1), y, s0)
                done += group.shape[0] * b_all
                if progress:
                    progress("ablate", done, total)
            counts._add_images(y)
            seen += b
        else:
            done += rem.shape[0] * b_all
    if seen == 0:
        raise DatasetError("no image of the selection has a class label")


def _zero_blocks(out: torch.Tensor, removed: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    """[G * B, ...] raw outputs -> a copy with the units ``removed[g]`` zeroed in row block g."""
    g = removed.shape[0]
    blocks = out.view(g, out.shape[0] // g, *out.shape[1:])
    keep = layout.keep_mask(~removed, out.shape)
    return torch.where(keep, blocks, torch.zeros((), dtype=out.dtype, device=out.device)).view_as(out)


def count_ties(values: np.ndarray) -> np.ndarray:
    """Per class, how many units share their balanced accuracy with another unit.

    A unit is tied for class c when at least one other unit leaves exactly the
    same balanced accuracy for c (so the accuracy alone cannot order them). NaN
    values tie with nothing.

    Args:
        values: float [U, K], balanced accuracy after removing each unit.

    Returns:
        int64 [K], the number of tied units of each class.
    """
    v = np.asarray(values, np.float64)
    out = np.zeros(v.shape[1], np.int64)
    for c in range(v.shape[1]):
        col = v[:, c]
        col = col[~np.isnan(col)]
        _, n = np.unique(col, return_counts=True)
        out[c] = int(n[n > 1].sum())
    return out


def rank_units(
    balanced: np.ndarray, margin_drop: np.ndarray, units: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Order units by importance to each class.

    Args:
        balanced: float [U, K], balanced accuracy after removing each unit alone.
        margin_drop: float [U, K], drop of the class's mean logit margin on its own
            images when the unit is removed (tie-breaker).
        units: int [U], the unit number of each row (default: 0..U-1).

    Returns:
        int64 [K, U]: unit numbers per class, most important first: lowest
        balanced accuracy, then largest margin drop, then lowest unit number
        (NaN sorts last).
    """
    ba = np.asarray(balanced, np.float64)
    drop = np.asarray(margin_drop, np.float64)
    ids = np.arange(ba.shape[0]) if units is None else np.asarray(units, np.int64)
    out = np.empty((ba.shape[1], ba.shape[0]), np.int64)
    for c in range(ba.shape[1]):
        order = np.lexsort((ids, -drop[:, c], ba[:, c]))
        out[c] = ids[order]
    return out


class _LayerState:
    """``state_dict`` and ``from_state_dict`` of a per-layer result dataclass.

    The result has ``layer``, ``classes``, a :class:`ClassAccuracy` ``baseline``
    and the arrays that ``_ARRAYS`` names, with their dtypes.
    """

    layer: str
    classes: list[str]
    baseline: ClassAccuracy
    _ARRAYS: ClassVar[dict[str, type]]

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays and strings (see :meth:`from_state_dict`).

        Returns:
            ``layer``, ``classes``, a copy of each array, and the baseline's
            :meth:`ClassAccuracy.state_dict` under ``baseline.`` keys.
        """
        state: dict[str, Any] = {"layer": self.layer, "classes": list(self.classes)}
        state.update({name: getattr(self, name).copy() for name in self._ARRAYS})
        state.update({f"baseline.{k}": v for k, v in self.baseline.state_dict().items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Self:
        """Rebuild from :meth:`state_dict` (the arrays copied, in their dtypes)."""
        prefix = "baseline."
        fields: dict[str, Any] = {
            "layer": str(state["layer"]),
            "classes": [str(c) for c in state["classes"]],
            "baseline": ClassAccuracy.from_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            ),
        }
        fields.update({name: np.array(state[name], dtype) for name, dtype in cls._ARRAYS.items()})
        return cls(**fields)


def _class_names(model: LoadedModel, dataset: ConceptDataset | None, k: int) -> list[str]:
    for names in (model.classes, getattr(dataset, "classes", None) or []):
        if len(names) == k:
            return [str(n) for n in names]
    return [str(i) for i in range(k)]


@dataclass
class UnitImportance(_LayerState):
    """How much each class depends on each unit of a layer (single-unit removal, training split).

    Attributes:
        layer: dotted layer name.
        classes: K class names.
        units: int64 [U'], the unit number of each row (all units by default).
        balanced_accuracy: float64 [U', K], balanced accuracy of class c with unit u alone removed.
        accuracy: float64 [U'], all-class accuracy with unit u removed.
        margin_drop: float64 [U', K], baseline mean logit margin of class c on its own
            images minus the same with unit u removed (the tie-breaker; positive = harmful).
        baseline: the network's :class:`ClassAccuracy` with nothing removed.
        baseline_margin: float64 [K], mean logit margin of each class on its own images.
        ranking: int64 [K, U'], unit numbers per class, most important first (:func:`rank_units`).
        tied: int64 [K], units whose balanced accuracy for the class equals another
            unit's (:func:`count_ties`), i.e. ordered by the tie-breaker only.
        unchanged: int64 [K], units whose removal leaves the class's balanced accuracy
            exactly at baseline.
    """

    layer: str
    classes: list[str]
    units: np.ndarray
    balanced_accuracy: np.ndarray
    accuracy: np.ndarray
    margin_drop: np.ndarray
    baseline: ClassAccuracy
    baseline_margin: np.ndarray
    ranking: np.ndarray
    tied: np.ndarray
    unchanged: np.ndarray

    _ARRAYS: ClassVar[dict[str, type]] = {
        "units": np.int64,
        "balanced_accuracy": np.float64,
        "accuracy": np.float64,
        "margin_drop": np.float64,
        "baseline_margin": np.float64,
        "ranking": np.int64,
        "tied": np.int64,
        "unchanged": np.int64,
    }

    @classmethod
    def from_counts(
        cls, layer: str, classes: Sequence[str], units: Sequence[int] | np.ndarray, counts: AblationCounts
    ) -> UnitImportance:
        """Importance from the counts of :func:`unit_ablations` (row 0: nothing removed).

        Args:
            layer: dotted layer name.
            classes: K class names.
            units: int [U'], the unit removed in count rows 1..U'.
            counts: the :class:`AblationCounts` of ``unit_ablations(U, units)``.

        Returns:
            the importance.
        """
        ids = np.asarray(units, np.int64)
        if counts.ablations != 1 + len(ids):
            raise DissectError(f"{counts.ablations} count rows for {len(ids)} units (expected 1 + units)")
        ba_all = counts.balanced_accuracy()
        margin = counts.mean_margin()
        ba = ba_all[1:]
        drop = margin[0][None, :] - margin[1:]
        return cls(
            layer=layer,
            classes=list(classes),
            units=ids,
            balanced_accuracy=ba,
            accuracy=counts.accuracy()[1:].copy(),
            margin_drop=drop,
            baseline=ClassAccuracy.from_counts(counts, 0),
            baseline_margin=margin[0].copy(),
            ranking=rank_units(ba, drop, ids),
            tied=count_ties(ba),
            unchanged=(ba == ba_all[0][None, :]).sum(axis=0).astype(np.int64),
        )

    @property
    def drop(self) -> np.ndarray:
        """float64 [U', K], baseline balanced accuracy minus the accuracy left."""
        return self.baseline.balanced_accuracy[None, :] - self.balanced_accuracy

    def most_important(self, cls: int, k: int) -> np.ndarray:
        """int64 [k], the k most important units of a class."""
        return self.ranking[cls, :k].copy()

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per (class, unit) in rank order: class, rank, unit, balanced_accuracy, drop, margin_drop."""
        pos = {int(u): i for i, u in enumerate(self.units)}
        for c, name in enumerate(self.classes):
            for rank, u in enumerate(self.ranking[c]):
                i = pos[int(u)]
                yield {
                    "class": name,
                    "class_index": c,
                    "rank": rank,
                    "unit": int(u),
                    "balanced_accuracy": float(self.balanced_accuracy[i, c]),
                    "drop": float(self.drop[i, c]),
                    "margin_drop": float(self.margin_drop[i, c]),
                }


def unit_importance(
    model: LoadedModel,
    dataset: ConceptDataset,
    layer: str,
    *,
    units: Sequence[int] | None = None,
    split: LayerSplit | None = None,
    **options: Unpack[AblationOptions],
) -> UnitImportance:
    """Remove each unit alone and measure every class's balanced accuracy (run it on the training split).

    Args:
        model: the classifier.
        dataset: the training images, with ``class_label``.
        layer: dotted layer name.
        units: the units to test (default: all).
        split: a :class:`LayerSplit` from :func:`split_network`, to reuse.
        **options: as for :func:`ablation_counts`.

    Returns:
        the :class:`UnitImportance`.
    """
    split = split if split is not None else split_network(model, layer, device=options.get("device"))
    removed = unit_ablations(split.units, units)
    ids = np.arange(split.units) if units is None else np.asarray([int(u) for u in units], np.int64)
    counts = ablation_counts(model, dataset, layer, removed, split=split, **options)
    return UnitImportance.from_counts(layer, _class_names(model, dataset, split.num_classes), ids, counts)


def _clip_ks(ks: Sequence[int] | None, num_units: int) -> np.ndarray:
    chosen = DEFAULT_KS if ks is None else ks
    out = sorted({min(int(k), num_units) for k in chosen if int(k) >= 1})
    if not out:
        raise DissectError(f"no set size k >= 1 in {list(chosen)}")
    return np.asarray(out, np.int64)


def set_ablations(
    ranking: np.ndarray, num_units: int, classes: Sequence[int] | np.ndarray, ks: Sequence[int] | np.ndarray
) -> torch.Tensor:
    """The ablation table of the set experiment.

    Args:
        ranking: int [K, U'], unit numbers per class, most important first.
        num_units: U, the layer's units.
        classes: the C' classes to test.
        ks: the n set sizes.

    Returns:
        bool [1 + 2 * C' * n, U]: row 0 removes nothing; for class i (in ``classes``
        order) and size j, row ``1 + 2 * (i * n + j)`` removes the k most important
        units and the next row removes every unit of the layer but those k.
    """
    rows = [torch.zeros(num_units, dtype=torch.bool)]
    for c in classes:
        for k in ks:
            top = torch.as_tensor(np.asarray(ranking[int(c), : int(k)], np.int64))
            r = torch.zeros(num_units, dtype=torch.bool)
            r[top] = True
            rows += [r, ~r]
    return torch.stack(rows)


@dataclass
class SetAblation(_LayerState):
    """Removing a class's most important units together, or all units but those (validation split).

    Attributes:
        layer: dotted layer name.
        classes: K class names.
        class_indices: int64 [C'], the classes tested.
        ks: int64 [n], set sizes.
        ranking: int64 [C', U'], the unit order used for each tested class.
        removed_top: float64 [C', n], balanced accuracy of the class with its k most
            important units removed.
        kept_top: float64 [C', n], with every unit but its k most important removed.
        removed_top_accuracy: float64 [C', n], all-class accuracy of the same networks.
        kept_top_accuracy: float64 [C', n].
        baseline: the network's :class:`ClassAccuracy` on this split.
    """

    layer: str
    classes: list[str]
    class_indices: np.ndarray
    ks: np.ndarray
    ranking: np.ndarray
    removed_top: np.ndarray
    kept_top: np.ndarray
    removed_top_accuracy: np.ndarray
    kept_top_accuracy: np.ndarray
    baseline: ClassAccuracy

    _ARRAYS: ClassVar[dict[str, type]] = {
        "class_indices": np.int64,
        "ks": np.int64,
        "ranking": np.int64,
        "removed_top": np.float64,
        "kept_top": np.float64,
        "removed_top_accuracy": np.float64,
        "kept_top_accuracy": np.float64,
    }

    @classmethod
    def from_counts(
        cls,
        layer: str,
        classes: Sequence[str],
        class_indices: Sequence[int] | np.ndarray,
        ks: Sequence[int] | np.ndarray,
        ranking: np.ndarray,
        counts: AblationCounts,
    ) -> SetAblation:
        """Results from the counts of :func:`set_ablations`.

        Args:
            layer: dotted layer name.
            classes: K class names.
            class_indices: the C' classes tested, in table order.
            ks: the n set sizes.
            ranking: int [K, U'], the ranking the table was built from.
            counts: the :class:`AblationCounts` of that table.

        Returns:
            the set results.
        """
        ci = np.asarray(class_indices, np.int64)
        kk = np.asarray(ks, np.int64)
        n = len(kk)
        if counts.ablations != 1 + 2 * len(ci) * n:
            raise DissectError(f"{counts.ablations} count rows for {len(ci)} classes x {n} sizes")
        ba = counts.balanced_accuracy()[1:].reshape(len(ci), n, 2, -1)
        acc = counts.accuracy()[1:].reshape(len(ci), n, 2)
        own = ba[np.arange(len(ci)), :, :, ci]
        return cls(
            layer,
            list(classes),
            ci,
            kk,
            np.asarray(ranking, np.int64)[ci].copy(),
            own[:, :, 0].copy(),
            own[:, :, 1].copy(),
            acc[:, :, 0].copy(),
            acc[:, :, 1].copy(),
            ClassAccuracy.from_counts(counts),
        )

    def summary(self, k: int = 20) -> dict[str, Any]:
        """The paper's headline numbers at one set size (Fig. 2d), as means over the tested classes.

        Args:
            k: the set size (the largest tested size not above it is used).

        Returns:
            dict with ``k``, ``classes`` (count), ``baseline``, ``removed_top`` and
            ``kept_top`` (mean balanced accuracy), and ``baseline_accuracy``,
            ``removed_top_accuracy``, ``kept_top_accuracy`` (mean all-class accuracy).
        """
        j = int(np.searchsorted(self.ks, k, side="right")) - 1
        j = max(j, 0)
        base = self.baseline.balanced_accuracy[self.class_indices]
        return {
            "k": int(self.ks[j]),
            "classes": len(self.class_indices),
            "baseline": float(np.nanmean(base)),
            "removed_top": float(np.nanmean(self.removed_top[:, j])),
            "kept_top": float(np.nanmean(self.kept_top[:, j])),
            "baseline_accuracy": self.baseline.accuracy,
            "removed_top_accuracy": float(np.mean(self.removed_top_accuracy[:, j])),
            "kept_top_accuracy": float(np.mean(self.kept_top_accuracy[:, j])),
        }

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per (class, k): class, k, baseline, removed_top, kept_top and their all-class accuracies."""
        for i, c in enumerate(self.class_indices):
            for j, k in enumerate(self.ks):
                yield {
                    "class": self.classes[int(c)],
                    "class_index": int(c),
                    "k": int(k),
                    "baseline": float(self.baseline.balanced_accuracy[c]),
                    "removed_top": float(self.removed_top[i, j]),
                    "kept_top": float(self.kept_top[i, j]),
                    "removed_top_accuracy": float(self.removed_top_accuracy[i, j]),
                    "kept_top_accuracy": float(self.kept_top_accuracy[i, j]),
                }


def ablate_sets(
    model: LoadedModel,
    dataset: ConceptDataset,
    layer: str,
    importance: UnitImportance,
    *,
    classes: Sequence[int] | None = None,
    ks: Sequence[int] | None = None,
    **options: Unpack[AblationOptions],
) -> SetAblation:
    """Remove each class's k most important units, and all units but those (run it on the validation split).

    Args:
        model: the classifier.
        dataset: the validation images, with ``class_label``.
        layer: the layer ``importance`` was measured on.
        importance: the ranking (from the training split).
        classes: class indices to test (default: those with training images).
        ks: set sizes (default :data:`DEFAULT_KS`); each is clipped to the number of
            ranked units (the layer's unit count unless ``importance`` covers fewer)
            and duplicates are dropped; ``range(1, U + 1)`` gives every k.
        **options: as for :func:`ablation_counts`.

    Returns:
        the :class:`SetAblation`; all its networks are evaluated in one cached pass.
    """
    if layer != importance.layer:
        raise DissectError(f"the importance was measured on {importance.layer!r}, not {layer!r}")
    split = split_network(model, layer, device=options.get("device"))
    num_units = split.units
    if len(importance.classes) != split.num_classes:
        raise DissectError(f"the importance has {len(importance.classes)} classes, the network {split.num_classes}")
    chosen = (
        np.flatnonzero(importance.baseline.class_counts > 0)
        if classes is None
        else np.asarray([int(c) for c in classes], np.int64)
    )
    bad = [int(c) for c in chosen if not 0 <= c < split.num_classes]
    if bad:
        raise DissectError(f"classes out of range 0..{split.num_classes - 1}: {bad[:5]}")
    sizes = _clip_ks(ks, len(importance.units))
    removed = set_ablations(importance.ranking, num_units, chosen, sizes)
    counts = ablation_counts(model, dataset, layer, removed, split=split, **options)
    return SetAblation.from_counts(layer, importance.classes, chosen, sizes, importance.ranking, counts)


@dataclass
class ImportanceInterpretability:
    """Unit importance against interpretability, the paper's Fig. 2e scatter.

    Attributes:
        units: int64 [U'], unit numbers.
        classes_in_top: int64 [U'], for how many of the tested classes the unit is
            among the ``top_k`` most important.
        iou: float64 [U'], the unit's IoU with its best concept.
        top_k: the importance cut-off.
        class_indices: int64 [C'], the classes counted.
    """

    units: np.ndarray
    classes_in_top: np.ndarray
    iou: np.ndarray
    top_k: int
    class_indices: np.ndarray

    def mean_iou_by_count(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The scatter's trend.

        Returns:
            (counts int64 [M], mean IoU float64 [M], units int64 [M]) for each
            distinct ``classes_in_top`` value, ascending.
        """
        values = np.unique(self.classes_in_top)
        mean = np.array([self.iou[self.classes_in_top == v].mean() for v in values], np.float64)
        n = np.array([(self.classes_in_top == v).sum() for v in values], np.int64)
        return values.astype(np.int64), mean, n

    def correlation(self) -> float:
        """Pearson correlation of ``classes_in_top`` and ``iou`` (NaN when either is constant)."""
        x, y = self.classes_in_top.astype(np.float64), self.iou
        if len(x) < 2 or x.std() == 0 or y.std() == 0:
            return float("nan")
        return float(np.corrcoef(x, y)[0, 1])

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (see :meth:`from_state_dict`)."""
        return {
            "units": self.units.copy(),
            "classes_in_top": self.classes_in_top.copy(),
            "iou": self.iou.copy(),
            "top_k": np.asarray(self.top_k, np.int64),
            "class_indices": self.class_indices.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ImportanceInterpretability:
        """Rebuild from :meth:`state_dict`."""
        return cls(
            np.asarray(state["units"], np.int64),
            np.asarray(state["classes_in_top"], np.int64),
            np.asarray(state["iou"], np.float64),
            int(np.asarray(state["top_k"])),
            np.asarray(state["class_indices"], np.int64),
        )


def importance_interpretability(
    importance: UnitImportance,
    iou: Any,
    *,
    top_k: int = 4,
    classes: Sequence[int] | None = None,
) -> ImportanceInterpretability:
    """Join each unit's importance count with its IoU (Fig. 2e).

    Args:
        importance: the single-unit ranking.
        iou: a :class:`~dissect_core.dissect.LayerResult` of the same layer, or
            float [U] (each unit's best IoU), or float [U, C] (IoU per concept; the
            maximum over concepts is used), indexed by unit number.
        top_k: a unit counts for a class when it is among its ``top_k`` most important.
        classes: the classes to count (default: those with training images).

    Returns:
        the :class:`ImportanceInterpretability` over the units of ``importance``.
    """
    table = np.asarray(getattr(iou, "iou", iou), np.float64)
    best = table.max(axis=1) if table.ndim == 2 else table.reshape(-1)
    if table.ndim == 2 and table.shape[1] == 0:
        best = np.zeros(table.shape[0])
    ids = importance.units
    if ids.size and int(ids.max()) >= best.shape[0]:
        raise DissectError(f"the IoU table covers {best.shape[0]} units; the importance has unit {int(ids.max())}")
    chosen = (
        np.flatnonzero(importance.baseline.class_counts > 0)
        if classes is None
        else np.asarray([int(c) for c in classes], np.int64)
    )
    top = importance.ranking[chosen, :top_k].reshape(-1)
    count = np.bincount(top, minlength=int(ids.max()) + 1 if ids.size else 0)
    return ImportanceInterpretability(
        ids.copy(), count[ids].astype(np.int64), best[ids].astype(np.float64), int(top_k), chosen.astype(np.int64)
    )

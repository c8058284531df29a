"""Adversarial attacks seen through units (Bau et al. 2020, Fig. 5).

A targeted L-infinity projected-gradient attack (PGD, Madry et al. 2018) moves
correctly classified images toward a target class; then the change of every
unit's peak (spatial max) activation at a layer is compared between the units most
important to the source class, those most important to the target class, and the
rest (importance from :func:`dissect_core.ablation.unit_importance`).

The paper attacks with Carlini & Wagner's method, which stops at a small
perturbation that just flips the class; here PGD, by default, freezes each image
at the first step where it is classified as the target (``stop_on_success``), so
the perturbation is likewise no larger than needed at the given step size.

Confidence intervals (:func:`confidence_interval`) are normal approximations over
images: mean +- z * s / sqrt(n), z the (1 + confidence) / 2 quantile of the
standard normal (2.576 for 99%), s the sample standard deviation (ddof 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ablation import UnitImportance
from .concepts import ConceptDataset, collate_samples
from .errors import DatasetError, DissectError
from .models import LoadedModel, layout_from_output
from .nethook import evaluating, get_module, trace
from .options import Run, RunOptions
from .progress import check_stop

__all__ = [
    "GROUPS",
    "AttackAnalysis",
    "PGDResult",
    "attack_unit_changes",
    "confidence_interval",
    "pgd_attack",
    "to_pixels",
]

GROUPS: tuple[str, ...] = ("source", "target", "other")


def _normalizer(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(list(mean), dtype=torch.float32, device=device)[None, :, None, None]
    s = torch.tensor(list(std), dtype=torch.float32, device=device)[None, :, None, None]
    return lambda x: (x - m) / s


def to_pixels(images: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """uint8 images to the network's input size in [0, 1] pixel space.

    The same scaling and resize as :func:`dissect_core.dissect.preprocess_images`,
    before normalisation.

    Args:
        images: uint8 [B, 3, H, W].
        input_size: (h, w).

    Returns:
        float32 [B, 3, h, w] in [0, 1].
    """
    x = images.to(torch.float32).div_(255.0)
    if tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
    return x


@dataclass
class PGDResult:
    """A targeted attack on a batch.

    Attributes:
        images: float32 [B, 3, H, W], the adversarial images in [0, 1].
        logits: float32 [B, K], the network's scores on them.
        success: bool [B], whether each is classified as its target.
        steps: int64 [B], gradient steps taken on each image.
    """

    images: torch.Tensor
    logits: torch.Tensor
    success: torch.Tensor
    steps: torch.Tensor


def pgd_attack(
    module: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    eps: float = 8 / 255,
    step: float = 1 / 255,
    iterations: int = 20,
    stop_on_success: bool = True,
) -> PGDResult:
    """Targeted L-infinity projected gradient descent on the cross-entropy to the target.

    Each step: x <- clip(x - step * sign(grad_x CE(f(norm(x)), target)), x0 - eps,
    x0 + eps) clipped to [0, 1]. The network's parameters are left untouched.

    Args:
        module: the classifier, mapping normalised images to logits [B, K].
        images: float [B, 3, H, W] in [0, 1] pixel space (see :func:`to_pixels`).
        targets: int [B], the target class of each image.
        mean: per-channel normalisation mean applied inside.
        std: per-channel normalisation std.
        eps: the L-infinity bound, in [0, 1] pixel units.
        step: the step size, in pixel units.
        iterations: the most steps.
        stop_on_success: freeze an image at the first iterate classified as its target.

    Returns:
        the :class:`PGDResult`.
    """
    if eps < 0 or step <= 0 or iterations < 0:
        raise DissectError(f"need eps >= 0, step > 0, iterations >= 0 (got {eps}, {step}, {iterations})")
    x0 = images.detach().to(torch.float32)
    y = targets.to(x0.device, torch.long)
    norm = _normalizer(mean, std, x0.device)
    x = x0.clone()
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    steps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with evaluating(module), torch.enable_grad():
        for _ in range(iterations):
            x.requires_grad_(True)
            logits = module(norm(x))
            if stop_on_success:
                active &= logits.argmax(dim=1) != y
                if not bool(active.any()):
                    break
            loss = F.cross_entropy(logits, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            move = (step * grad.sign()) * active.view(-1, 1, 1, 1)
            x = x.detach() - move
            x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)
            steps += active.long()
        with torch.no_grad():
            x = x.detach()
            logits = module(norm(x)).float()
    return PGDResult(x, logits, logits.argmax(dim=1) == y, steps)


def confidence_interval(values: np.ndarray | Sequence[float], confidence: float = 0.99) -> tuple[float, float, float]:
    """Mean and normal-approximation confidence interval.

    Args:
        values: float [n].
        confidence: the interval's coverage.

    Returns:
        (mean, low, high): mean +- z * s / sqrt(n) with z the (1 + confidence) / 2
        normal quantile and s the sample standard deviation (ddof 1); NaN bounds
        for n < 2, all NaN for n = 0.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * float(v.std(ddof=1)) / float(np.sqrt(v.size))
    return mean, mean - half, mean + half


@dataclass
class AttackAnalysis:
    """Which units a targeted attack changes (Fig. 5c).

    Attributes:
        layer: dotted layer name.
        classes: K class names.
        eps: the L-infinity bound in pixel units.
        step: the step size.
        iterations: the most steps.
        top_k: how many of each class's most important units form its group.
        n_images: images looked at.
        image_indices: int64 [M], dataset indices of the attacked (correctly classified) images.
        source: int64 [M], their classes.
        target: int64 [M], the attack's target classes.
        success: bool [M], attacks that reached the target.
        clean_peaks: float32 [M, U], peak activations of the clean images.
        peak_change: float32 [M, U], adversarial minus clean peak activation.
        linf: float32 [M], the perturbation's L-infinity size in pixel units.
        ranking: int64 [K, U'], the unit ranking the groups come from.
    """

    layer: str
    classes: list[str]
    eps: float
    step: float
    iterations: int
    top_k: int
    n_images: int
    image_indices: np.ndarray
    source: np.ndarray
    target: np.ndarray
    success: np.ndarray
    clean_peaks: np.ndarray
    peak_change: np.ndarray
    linf: np.ndarray
    ranking: np.ndarray

    @property
    def success_rate(self) -> float:
        """Share of attacked images classified as their target (NaN when none was attacked)."""
        return float(self.success.mean()) if self.success.size else float("nan")

    def group_changes(self, successful_only: bool = True) -> np.ndarray:
        """Per image, the mean absolute peak change of each unit group.

        Groups: ``source`` = the ``top_k`` most important units of the image's class,
        ``target`` = those of the target class, ``other`` = every unit of the layer in
        neither (a unit in both top lists counts in both).

        Args:
            successful_only: keep only the attacks that succeeded.

        Returns:
            float64 [M', 3], columns in :data:`GROUPS` order.
        """
        keep = self.success if successful_only else np.ones(len(self.success), bool)
        change = np.abs(self.peak_change[keep].astype(np.float64))
        out = np.zeros((change.shape[0], 3), np.float64)
        units = self.peak_change.shape[1]
        for row, (s, t) in enumerate(zip(self.source[keep], self.target[keep])):
            src = self.ranking[s, : self.top_k]
            tgt = self.ranking[t, : self.top_k]
            rest = np.ones(units, bool)
            rest[src] = False
            rest[tgt] = False
            out[row] = (
                change[row, src].mean(),
                change[row, tgt].mean(),
                change[row, rest].mean() if rest.any() else np.nan,
            )
        return out

    def summary(self, confidence: float = 0.99, successful_only: bool = True) -> dict[str, Any]:
        """Mean absolute peak change per group with confidence intervals (:func:`confidence_interval`).

        Args:
            confidence: the intervals' coverage.
            successful_only: average over successful attacks only.

        Returns:
            dict with ``success_rate``, ``attacked``, ``images`` (averaged over),
            ``confidence`` and, per group name, ``{"mean", "low", "high"}``.
        """
        per = self.group_changes(successful_only)
        out: dict[str, Any] = {
            "success_rate": self.success_rate,
            "attacked": len(self.success),
            "images": int(per.shape[0]),
            "confidence": confidence,
        }
        for j, name in enumerate(GROUPS):
            col = per[:, j]
            mean, low, high = confidence_interval(col[~np.isnan(col)], confidence)
            out[name] = {"mean": mean, "low": low, "high": high}
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays, numbers and strings (see :meth:`from_state_dict`)."""
        return {
            "layer": self.layer,
            "classes": list(self.classes),
            "eps": self.eps,
            "step": self.step,
            "iterations": self.iterations,
            "top_k": self.top_k,
            "n_images": self.n_images,
            "image_indices": self.image_indices.copy(),
            "source": self.source.copy(),
            "target": self.target.copy(),
            "success": self.success.copy(),
            "clean_peaks": self.clean_peaks.copy(),
            "peak_change": self.peak_change.copy(),
            "linf": self.linf.copy(),
            "ranking": self.ranking.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AttackAnalysis:
        """Rebuild from :meth:`state_dict`."""
        return cls(
            str(state["layer"]),
            [str(c) for c in state["classes"]],
            float(state["eps"]),
            float(state["step"]),
            int(state["iterations"]),
            int(state["top_k"]),
            int(state["n_images"]),
            np.asarray(state["image_indices"], np.int64),
            np.asarray(state["source"], np.int64),
            np.asarray(state["target"], np.int64),
            np.asarray(state["success"], bool),
            np.asarray(state["clean_peaks"], np.float32),
            np.asarray(state["peak_change"], np.float32),
            np.asarray(state["linf"], np.float32),
            np.asarray(state["ranking"], np.int64),
        )


def _peaks(model: LoadedModel, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, K], each unit's peak activation [B, U]) of a batch; the layer's output is laid out as maps
    first (:mod:`dissect_core.layouts`), so a token layer's peak is over its patch tokens."""
    with torch.no_grad(), trace(model.module, [layer]) as tr:
        logits = tr(x)
    a = tr[layer]
    maps = layout_from_output(model, layer, a, x.shape[0]).to_map(a)
    return logits.float(), maps.float().amax(dim=(2, 3))


def attack_unit_changes(
    model: LoadedModel,
    dataset: ConceptDataset,
    layer: str,
    importance: UnitImportance | np.ndarray,
    *,
    targets: int | Sequence[int] | None = None,
    target_classes: Sequence[int] | None = None,
    top_k: int = 4,
    eps: float = 8 / 255,
    step: float = 1 / 255,
    iterations: int = 20,
    stop_on_success: bool = True,
    max_images: int | None = None,
    seed: int = 0,
    **options: Unpack[RunOptions],
) -> AttackAnalysis:
    """Attack correctly classified images toward other classes and record every unit's peak change.

    Args:
        model: the classifier (not TorchScript).
        dataset: images with ``class_label`` (the validation split, typically).
        layer: dotted layer name.
        importance: the :class:`~dissect_core.ablation.UnitImportance` of that layer,
            or its ranking int [K, U'] (unit numbers per class, most important first).
        targets: None (each image gets a uniformly random class other than its
            own, from ``target_classes``, seeded by ``seed``), one class for every
            image (images of that class are skipped), or one class per index.
        target_classes: the classes random targets are drawn from (default: all
            classes with a ranking that had training images, else all).
        top_k: size of the source and target unit groups.
        eps, step, iterations, stop_on_success: as for :func:`pgd_attack`.
        max_images: stop after attacking this many images.
        seed: seeds the random targets.
        **options: the :class:`~dissect_core.options.RunOptions` (``batch_size``
            default 32, images per attack batch); ``indices`` are the images to
            consider; ``progress("attack", done, total)`` counts them.

    Returns:
        the :class:`AttackAnalysis`.

    Raises:
        DissectError: a TorchScript model, or a ranking that does not fit the network.
        DatasetError: bad indices or targets.
    """
    from torch.utils.data import DataLoader, Dataset

    if isinstance(model.module, torch.jit.ScriptModule):
        raise DissectError("the attack analysis records layers with hooks, which TorchScript models do not run")
    get_module(model.module, layer)
    run = Run.of(options, batch_size=32)
    dev, progress = run.device, run.progress
    ranking = np.asarray(importance.ranking if isinstance(importance, UnitImportance) else importance, np.int64)
    n = len(dataset)
    idx = list(range(n)) if run.indices is None else [int(i) for i in run.indices]
    if any(not 0 <= i < n for i in idx):
        raise DatasetError(f"image indices out of range 0..{n - 1}")
    if isinstance(targets, int | np.integer):
        fixed: list[int] | None = [int(targets)] * len(idx)
    elif targets is not None:
        fixed = [int(t) for t in targets]
        if len(fixed) != len(idx):
            raise DatasetError(f"{len(fixed)} targets for {len(idx)} images")
    else:
        fixed = None
    k = ranking.shape[0]
    if target_classes is None:
        pool = (
            np.flatnonzero(importance.baseline.class_counts > 0)
            if isinstance(importance, UnitImportance)
            else np.arange(k)
        )
    else:
        pool = np.asarray([int(c) for c in target_classes], np.int64)
    if len(pool) < 2 and fixed is None:
        raise DissectError("random targets need at least two target classes")
    rng = np.random.default_rng(seed)
    module = model.module.to(dev)
    norm = _normalizer(model.mean, model.std, dev)
    names = list(importance.classes) if isinstance(importance, UnitImportance) else [str(c) for c in range(k)]

    class _Rows(Dataset):
        def __len__(self) -> int:
            return len(idx)

        def __getitem__(self, i: int) -> Any:
            return i, dataset[idx[i]]

    loader = DataLoader(
        _Rows(), batch_size=run.batch_size, shuffle=False, num_workers=run.num_workers, collate_fn=collate_samples
    )
    parts: dict[str, list[np.ndarray]] = {
        key: [] for key in ("index", "source", "target", "success", "clean", "change", "linf")
    }
    attacked = 0
    seen = 0
    if progress:
        progress("attack", 0, len(idx))
    with evaluating(module):
        for batch in loader:
            if max_images is not None and attacked >= max_images:
                break
            check_stop(run.should_stop, "attack")
            rows = batch.indices.numpy()
            y = batch.class_labels.to(dev)
            x = to_pixels(batch.images.to(dev), model.input_size)
            logits, clean = _peaks(model, layer, norm(x))
            if logits.shape[1] != k:
                raise DissectError(f"the ranking has {k} classes, the network {logits.shape[1]}")
            if fixed is not None:
                t = torch.tensor([fixed[r] for r in rows], dtype=torch.long, device=dev)
                if bool(((t < 0) | (t >= k)).any()):
                    raise DatasetError(f"targets must lie in 0..{k - 1}")
            else:
                choice = []
                for label in y.tolist():
                    others = pool[pool != label]
                    choice.append(int(others[rng.integers(len(others))]) if len(others) else -1)
                t = torch.tensor(choice, dtype=torch.long, device=dev)
            keep = (y >= 0) & (logits.argmax(dim=1) == y) & (t != y) & (t >= 0)
            if max_images is not None:
                room = max_images - attacked
                keep &= torch.cumsum(keep.long(), 0) <= room
            seen += len(rows)
            if bool(keep.any()):
                result = pgd_attack(
                    module,
                    x[keep],
                    t[keep],
                    mean=model.mean,
                    std=model.std,
                    eps=eps,
                    step=step,
                    iterations=iterations,
                    stop_on_success=stop_on_success,
                )
                adv_logits, adv = _peaks(model, layer, norm(result.images))
                sel = keep.cpu().numpy()
                parts["index"].append(np.asarray([idx[r] for r in rows[sel]], np.int64))
                parts["source"].append(y[keep].cpu().numpy())
                parts["target"].append(t[keep].cpu().numpy())
                parts["success"].append((adv_logits.argmax(dim=1) == t[keep]).cpu().numpy())
                parts["clean"].append(clean[keep].cpu().numpy())
                parts["change"].append((adv - clean[keep]).cpu().numpy())
                parts["linf"].append((result.images - x[keep]).abs().amax(dim=(1, 2, 3)).cpu().numpy())
                attacked += int(sel.sum())
            if progress:
                progress("attack", seen, len(idx))

    def cat(key: str, dtype: Any, width: int = 0) -> np.ndarray:
        if parts[key]:
            return np.concatenate(parts[key]).astype(dtype)
        return np.zeros((0, width) if width else 0, dtype)

    units = int(ranking.max()) + 1 if ranking.size else 0
    return AttackAnalysis(
        layer=layer,
        classes=names,
        eps=float(eps),
        step=float(step),
        iterations=int(iterations),
        top_k=int(top_k),
        n_images=seen,
        image_indices=cat("index", np.int64),
        source=cat("source", np.int64),
        target=cat("target", np.int64),
        success=cat("success", bool),
        clean_peaks=cat("clean", np.float32, units),
        peak_change=cat("change", np.float32, units),
        linf=cat("linf", np.float32),
        ranking=ranking,
    )

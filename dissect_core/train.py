"""Train a built-in scene classifier on a concept dataset's scene classes.

Meant for small datasets (the synthetic demo, tests): the images are decoded
once into memory as uint8. Training is deterministic for a given seed, device
and thread count; it uses whatever ``torch.get_num_threads()`` the caller set.
Inputs are normalised as ``(image / 255 - mean) / std`` with the per-channel
mean and std of the training images, returned in the info dict so that users
of the model normalise the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .archs import build_arch
from .concepts import ConceptDataset
from .errors import DatasetError
from .nethook import ForwardHook, evaluating, forward_hooks

__all__ = ["MAX_IN_MEMORY_BYTES", "evaluate_accuracy", "load_class_arrays", "normalize", "train_classifier"]

MAX_IN_MEMORY_BYTES = 2 << 30


def load_class_arrays(dataset: ConceptDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image with a scene class into memory.

    Args:
        dataset: a dataset whose samples carry ``class_label`` (>= 0 to keep).

    Returns:
        (images, labels): uint8 tensor [N, 3, H, W] and int64 tensor [N].

    Raises:
        DatasetError: the dataset is too large for memory or has no labelled image.
    """
    h, w = dataset.image_size
    if len(dataset) * 3 * h * w > MAX_IN_MEMORY_BYTES:
        raise DatasetError(
            f"dataset {dataset.name} is too large to train on in memory ({len(dataset)} images of {h}x{w})", path=""
        )
    images = np.empty((len(dataset), h, w, 3), np.uint8)
    labels = np.empty(len(dataset), np.int64)
    for i in range(len(dataset)):
        sample = dataset[i]
        images[i] = sample.image
        labels[i] = sample.class_label
    keep = labels >= 0
    if not keep.any():
        raise DatasetError(f"dataset {dataset.name} has no image with a scene class", path="")
    return torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[keep])


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalise uint8 images for a model trained here.

    Args:
        images: uint8 tensor [B, 3, H, W].
        mean: per-channel mean of image / 255.
        std: per-channel std of image / 255.

    Returns:
        float32 tensor [B, 3, H, W].
    """
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: list[float],
    std: list[float],
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of a classifier.

    Args:
        model: classifier mapping normalised [B, 3, H, W] to logits [B, C];
            evaluated in eval mode, its training flag restored afterwards.
        images: uint8 tensor [N, 3, H, W].
        labels: int64 tensor [N].
        mean: normalisation mean (see :func:`normalize`).
        std: normalisation std.
        batch_size: evaluation batch size.

    Returns:
        The fraction of correct predictions (0.0 for N = 0).
    """
    if len(labels) == 0:
        return 0.0
    device = next(model.parameters()).device
    correct = 0
    with evaluating(model):
        for start in range(0, len(labels), batch_size):
            x = normalize(images[start : start + batch_size].to(device), mean, std)
            correct += int((model(x).argmax(1).cpu() == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def train_classifier(
    dataset: ConceptDataset,
    *,
    val_dataset: ConceptDataset | None = None,
    arch: str = "scenecnn",
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: bool = True,
    activation_l1: float = 0.0,
    l1_layer: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Train a built-in classifier on the scene classes of a dataset.

    SGD with Nesterov momentum 0.9 and a one-cycle learning-rate schedule
    (peak ``lr``); random horizontal flips when ``augment``.

    ``activation_l1`` adds that multiple of the mean activation of ``l1_layer``
    to the loss. BatchNorm centres every unit's input, so after the ReLU each
    unit of a BN network fires over a large part of every image; the units of the
    paper's VGG-16 ``conv5_3`` (no BN) are sparse detectors. The penalty makes
    the layer sparse again, which is what lets a class's few most important
    units carry it (the paper's Figure 2d; see the demo).

    Args:
        dataset: training images; ``dataset.classes`` names the classes and
            samples carry ``class_label`` (samples with -1 are skipped).
        val_dataset: validation images (same classes), or None.
        arch: a built-in architecture name (``scenecnn``; ``builtin:`` prefix allowed).
        epochs: passes over the training set.
        batch_size: minibatch size.
        lr: peak learning rate.
        weight_decay: L2 weight decay.
        seed: seeds weight initialisation, shuffling and augmentation.
        device: where to train.
        augment: random horizontal flips.
        activation_l1: weight of the activation penalty (0: none).
        l1_layer: dotted name of the layer it applies to (required when
            ``activation_l1`` > 0).
        progress: called with one line of text per epoch.

    Returns:
        (model, info): the trained model in eval mode on ``device``, and a dict
        with ``arch`` (``"builtin:<name>"``), ``num_classes``, ``classes``,
        ``input_size`` [H, W], ``mean``, ``std`` (per channel, of image / 255),
        ``train_accuracy`` and ``val_accuracy`` (lists, one per epoch; the
        latter empty without ``val_dataset``), ``epochs``, ``seed``,
        ``seconds``.

    Raises:
        DatasetError: the dataset has no scene classes or no labelled image.
        ValueError: ``activation_l1`` is negative, or positive without an
            existing ``l1_layer``.
    """
    start = time.monotonic()
    if activation_l1 < 0:
        raise ValueError(f"activation_l1 must be >= 0, got {activation_l1}")
    classes = list(getattr(dataset, "classes", []))
    if not classes:
        raise DatasetError(f"dataset {dataset.name} has no scene classes to train on", path="")
    images, labels = load_class_arrays(dataset)
    if val_dataset is not None:
        val_images, val_labels = load_class_arrays(val_dataset)
    else:
        val_images, val_labels = images[:0], labels[:0]

    flat = images.float().div_(255.0).transpose(0, 1).reshape(3, -1)
    mean = flat.mean(1).tolist()
    std = flat.std(1).clamp_min(1e-3).tolist()
    del flat

    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_arch(arch, len(classes))
    model.to(device)
    penalties: list[torch.Tensor] = []
    hooks: list[tuple[nn.Module, ForwardHook]] = []
    if activation_l1 > 0:
        try:
            target = model.get_submodule(l1_layer or "")
        except AttributeError:
            target = None
        if not l1_layer or target is None:
            raise ValueError(f"activation_l1 needs l1_layer, a layer of {arch}; got {l1_layer!r}")
        hooks.append((target, lambda _m, _i, out: penalties.append(out.mean()) if model.training else None))
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.25
    )

    train_acc: list[float] = []
    val_acc: list[float] = []
    with forward_hooks(model, hooks):
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(labels), generator=generator)
            correct = 0
            total_loss = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size]
                x = images[idx]
                if augment:
                    flip = torch.rand(len(idx), generator=generator) < 0.5
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
                x = normalize(x.to(device), mean, std)
                y = labels[idx].to(device)
                penalties.clear()
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if penalties:
                    loss = loss + activation_l1 * penalties[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                correct += int((logits.argmax(1) == y).sum())
                total_loss += float(loss.detach()) * len(idx)
            train_acc.append(correct / len(labels))
            if len(val_labels):
                val_acc.append(evaluate_accuracy(model, val_images, val_labels, mean, std))
            if progress is not None:
                line = f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(labels):.3f} train acc {train_acc[-1]:.3f}"
                if val_acc:
                    line += f" val acc {val_acc[-1]:.3f}"
                progress(line)
    model.eval()
    info = {
        "arch": f"builtin:{arch.removeprefix('builtin:')}",
        "num_classes": len(classes),
        "classes": classes,
        "input_size": list(dataset.image_size),
        "mean": mean,
        "std": std,
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "epochs": epochs,
        "seed": seed,
        "activation_l1": activation_l1,
        "l1_layer": l1_layer if activation_l1 > 0 else None,
        "seconds": time.monotonic() - start,
    }
    return model, info

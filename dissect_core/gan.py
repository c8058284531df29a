"""A small GAN and a small segmenter trained on concept datasets (the generator demo).

The paper dissects a scene GAN (Progressive GAN on LSUN) by segmenting its
outputs; the demo reproduces that at toy scale on the synthetic scenes of
:mod:`dissect_core.synthetic`:

- :func:`train_gan` trains a DCGAN generator (:data:`GENERATOR_ARCHS`) against a
  spectrally normalised discriminator with the hinge loss. Its layers, by
  dotted name (each ``layerN`` block outputs ConvTranspose -> BatchNorm -> ReLU,
  so a hook on ``layerN`` sees rectified activations)::

      latent   [B, Z] or [B, Z, 1, 1] -> [B, Z, 1, 1]
      layer1   Z -> 256    4 x 4
      layer2   256 -> 128  8 x 8
      layer3   128 -> 64   16 x 16
      layer4   64 -> 32    32 x 32
      output   32 -> 3     64 x 64, tanh: images in [-1, 1]

- :func:`train_segmenter` trains :func:`dissect_core.archs.segnet` on the
  per-pixel labels of one category (``object`` by default), so that
  :class:`dissect_core.segmenter.Segmenter` can label generated images.

Both load the training images into memory as uint8 (small datasets only, like
:mod:`dissect_core.train`), and both are deterministic for a given seed, device
and thread count.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .archs import _builtin_key, segnet
from .concepts import ConceptDataset
from .errors import DatasetError, ModelLoadError
from .nethook import evaluating
from .progress import check_stop
from .train import MAX_IN_MEMORY_BYTES, normalize

__all__ = [
    "DCGAN_WIDTHS",
    "GENERATOR_ARCHS",
    "DCGANGenerator",
    "build_generator",
    "evaluate_segmentation",
    "load_category_arrays",
    "train_gan",
    "train_segmenter",
]

DCGAN_WIDTHS: tuple[int, int, int, int] = (256, 128, 64, 32)
_DISC_WIDTHS: tuple[int, int, int, int] = (16, 32, 64, 128)


class _ToMap(nn.Module):
    """[B, Z] or [B, Z, 1, 1] -> [B, Z, 1, 1]."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 4 and z.shape[2:] == (1, 1):
            z = z.flatten(1)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"expected a latent of shape [B, {self.latent_dim}] or [B, {self.latent_dim}, 1, 1], "
                f"got {tuple(z.shape)}"
            )
        return z[:, :, None, None]


def _up(cin: int, cout: int, first: bool = False) -> nn.Sequential:
    conv = (
        nn.ConvTranspose2d(cin, cout, 4, 1, 0, bias=False)
        if first
        else nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)
    )
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


class DCGANGenerator(nn.Sequential):
    """A DCGAN generator for 64 x 64 images (layers in the module docstring).

    Args:
        latent_dim: Z, the size of the latent vector.
        widths: channels of layer1..layer4.

    The forward pass maps float [B, Z] (or [B, Z, 1, 1]) to float images
    [B, 3, 64, 64] in [-1, 1].
    """

    def __init__(self, latent_dim: int = 128, widths: Sequence[int] = DCGAN_WIDTHS) -> None:
        c1, c2, c3, c4 = (int(w) for w in widths)
        super().__init__(
            OrderedDict(
                latent=_ToMap(latent_dim),
                layer1=_up(latent_dim, c1, first=True),
                layer2=_up(c1, c2),
                layer3=_up(c2, c3),
                layer4=_up(c3, c4),
                output=nn.Sequential(nn.ConvTranspose2d(c4, 3, 4, 2, 1), nn.Tanh()),
            )
        )
        self.latent_dim = latent_dim
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _dcgan(latent_dim: int) -> nn.Module:
    return DCGANGenerator(latent_dim)


GENERATOR_ARCHS: dict[str, Callable[[int], nn.Module]] = {"dcgan": _dcgan}


def build_generator(arch: str, latent_dim: int = 128) -> nn.Module:
    """Build a built-in generator.

    Args:
        arch: a key of :data:`GENERATOR_ARCHS`, with or without the ``builtin:`` prefix.
        latent_dim: Z.

    Returns:
        The freshly initialised generator (training mode).

    Raises:
        ModelLoadError: an unknown name (the message lists the known ones).
    """
    key = _builtin_key(arch, GENERATOR_ARCHS, "generator")
    if latent_dim < 1:
        raise ModelLoadError(f"latent_dim must be positive, got {latent_dim}")
    return GENERATOR_ARCHS[key](int(latent_dim))


def _discriminator(widths: Sequence[int] = _DISC_WIDTHS) -> nn.Module:
    sn = nn.utils.spectral_norm
    c1, c2, c3, c4 = widths
    return nn.Sequential(
        sn(nn.Conv2d(3, c1, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        sn(nn.Conv2d(c1, c2, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        sn(nn.Conv2d(c2, c3, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        sn(nn.Conv2d(c3, c4, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        sn(nn.Linear(c4 * 16, 1)),
    )


def _load_images(dataset: ConceptDataset) -> torch.Tensor:
    h, w = dataset.image_size
    if len(dataset) == 0:
        raise DatasetError(f"dataset {dataset.name} is empty", path="")
    if len(dataset) * 3 * h * w > MAX_IN_MEMORY_BYTES:
        raise DatasetError(
            f"dataset {dataset.name} is too large to train on in memory ({len(dataset)} images of {h}x{w})", path=""
        )
    images = np.empty((len(dataset), h, w, 3), np.uint8)
    for i in range(len(dataset)):
        images[i] = dataset[i].image
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads (process-wide in torch), then restore the setting."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _standing_stats(
    generator: nn.Module, latent_dim: int, rng: torch.Generator, samples: int = 1024, batch_size: int = 64
) -> None:
    """Replace BatchNorm running statistics by exact averages over fresh samples."""
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    generator.train()
    device = next(generator.parameters()).device
    for start in range(0, max(samples, 2), batch_size):
        n = min(batch_size, max(samples, 2) - start)
        generator(torch.randn(n, latent_dim, generator=rng).to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    generator.eval()


def train_gan(
    dataset: ConceptDataset,
    *,
    arch: str = "dcgan",
    latent_dim: int = 128,
    steps: int = 2500,
    batch_size: int = 16,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    stat_samples: int = 1024,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[nn.Module, dict]:
    """Train a built-in generator on a dataset's images.

    Hinge loss, a spectrally normalised DCGAN discriminator (a quarter of the
    generator's width: the cost of a step is mostly the generator's), one
    discriminator step per generator step, Adam (``lr``, betas (0.0, 0.9)) for
    both; real images are flipped horizontally at random. The generator
    returned is the exponential moving average of the trained one's weights
    (decay ``ema_decay``, warmed up as min(decay, (1 + t) / (10 + t))), which
    gives much cleaner samples this early in training; its BatchNorm
    statistics are then recomputed exactly over ``stat_samples`` fresh samples,
    so that eval mode reproduces training-mode outputs.

    At this size small batches and many steps learn fastest for the compute:
    the default 2,500 steps of 16 take about 4.3 minutes on two idle CPU
    cores, 6 on one (measured 2026-11-30), and give scenes with a sky, a
    ground and recognisable object blobs (trees, houses, boats, people, the sun). The weights depend on the seed,
    the device and the thread count only.

    Args:
        dataset: training images (their size must be the generator's: 64 x 64);
            masks are ignored.
        arch: a key of :data:`GENERATOR_ARCHS` (``builtin:`` prefix allowed).
        latent_dim: Z.
        steps: generator updates.
        batch_size: images per step (real and generated each).
        lr: Adam learning rate.
        ema_decay: decay of the weight average returned (0: the last weights).
        seed: seeds initialisation, latents, sampling and augmentation.
        stat_samples: generated samples the final BatchNorm statistics average over.
        device: where to train.
        threads: CPU intra-op threads while training (restored afterwards);
            None keeps the caller's setting. With batches this small, one
            thread on two idle cores is about 1.4x slower than two, but on
            busy cores two threads waiting on each other were ten times
            slower than one (measured on the demo, load 5 to 8).
        progress: called with one line of text every 100 steps, or None.
        should_stop: polled every step; True raises
            :class:`~dissect_core.errors.Cancelled`.

    Returns:
        (generator, info): the generator in eval mode on ``device`` (float
        [B, Z] -> [B, 3, 64, 64] in [-1, 1]), and a dict with ``arch``
        (``"builtin:<name>"``), ``latent_dim``, ``steps``, ``batch_size``,
        ``seed``, ``seconds``, ``loss_d`` and ``loss_g`` (means over the last
        100 steps).

    Raises:
        ModelLoadError: an unknown arch.
        DatasetError: an empty or too large dataset, or images of another size
            than the generator's.
        Cancelled: ``should_stop`` said so.
    """
    with _cpu_threads(threads):
        start = time.monotonic()
        device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = build_generator(arch, latent_dim)
            disc = _discriminator()
        with torch.no_grad():
            out_size = tuple(generator.eval()(torch.zeros(1, latent_dim)).shape[-2:])
        if tuple(dataset.image_size) != out_size:
            raise DatasetError(
                f"the generator makes {out_size[0]}x{out_size[1]} images, dataset {dataset.name} "
                f"holds {dataset.image_size[0]}x{dataset.image_size[1]}",
                path="",
            )
        images = _load_images(dataset)
        average = copy.deepcopy(generator).to(device)
        generator.to(device).train()
        disc.to(device).train()
        opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.0, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.0, 0.9))
        rng = torch.Generator().manual_seed(seed)
        recent_d: list[float] = []
        recent_g: list[float] = []
        for step in range(1, steps + 1):
            check_stop(should_stop, "GAN training")
            idx = torch.randint(len(images), (batch_size,), generator=rng)
            flip = torch.rand(batch_size, generator=rng) < 0.5
            z = torch.randn(batch_size, latent_dim, generator=rng).to(device)
            real = images[idx]
            real = torch.where(flip.view(-1, 1, 1, 1), real.flip(3), real).to(device).float().div_(127.5).sub_(1.0)

            fake = generator(z)
            loss_d = F.relu(1.0 - disc(real)).mean() + F.relu(1.0 + disc(fake.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            loss_g = -disc(fake).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            with torch.no_grad():
                keep = min(ema_decay, (1.0 + step) / (10.0 + step))
                for pa, p in zip(average.parameters(), generator.parameters()):
                    pa.lerp_(p, 1.0 - keep)

            recent_d = ([*recent_d, float(loss_d.detach())])[-100:]
            recent_g = ([*recent_g, float(loss_g.detach())])[-100:]
            if progress is not None and (step % 100 == 0 or step == steps):
                progress(
                    f"step {step}/{steps}: loss D {np.mean(recent_d):.3f} G {np.mean(recent_g):.3f} "
                    f"({time.monotonic() - start:.0f}s)"
                )
        _standing_stats(average, latent_dim, rng, samples=stat_samples)
        info = {
            "arch": f"builtin:{arch.removeprefix('builtin:')}",
            "latent_dim": latent_dim,
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "seconds": time.monotonic() - start,
            "loss_d": float(np.mean(recent_d)) if recent_d else None,
            "loss_g": float(np.mean(recent_g)) if recent_g else None,
        }
        return average, info


def load_category_arrays(
    dataset: ConceptDataset, category: str = "object"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every image and its per-pixel labels of one category into memory.

    Args:
        dataset: a concept dataset with masks.
        category: the category whose concepts become the classes.

    Returns:
        (images, targets, labels): uint8 tensor [N, 3, H, W]; int64 tensor
        [N, sh, sw] (mask resolution) of class indices, 0 where the pixel holds
        no concept of the category; the class names, ``labels[0] == "-"`` and
        ``labels[i]`` the i-th concept of the category in concept-number order.

    Raises:
        DatasetError: the dataset is empty, too large, or has no concept of the category.
    """
    concepts = [c for c in dataset.concepts if c.category == category]
    if not concepts:
        raise DatasetError(f"dataset {dataset.name} has no concept of category {category!r}", path="")
    images = _load_images(dataset)
    lut = np.zeros(len(dataset.concepts) + 1, np.int64)
    for i, c in enumerate(concepts):
        lut[c.number] = i + 1
    sh, sw = dataset.mask_size
    targets = np.zeros((len(dataset), sh, sw), np.int64)
    for i in range(len(dataset)):
        for label_map in dataset[i].label_maps:
            cls = lut[label_map]
            targets[i] = np.where(targets[i] == 0, cls, targets[i])
    return images, torch.from_numpy(targets), ["-"] + [c.name for c in concepts]


def _scores_at(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate_segmentation(
    module: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> dict:
    """Pixel accuracy and IoU of a segmenter, the way :class:`~dissect_core.segmenter.Segmenter` labels.

    Predictions are the per-pixel argmax at the module's own output resolution
    (a quarter of the image for segnet); the targets are reduced to it by
    nearest sampling (:func:`dissect_core.broden.resize_nearest`).

    Args:
        module: maps normalised float [B, 3, H, W] to scores [B, L, h, w];
            evaluated in eval mode, its training flag restored afterwards.
        images: uint8 tensor [N, 3, H, W].
        targets: int64 tensor [N, sh, sw] of class indices.
        num_classes: L.
        mean: normalisation mean.
        std: normalisation std.
        batch_size: evaluation batch size.

    Returns:
        dict with ``pixel_accuracy``, ``miou`` (mean IoU over the classes 1..L-1
        present in targets or predictions), ``iou`` and ``pixel_share`` /
        ``predicted_share`` (lists of L: per-class IoU, None for a class absent
        from both, and fractions of pixels).
    """
    from .broden import resize_nearest

    if len(images) == 0:
        raise ValueError("no images to evaluate on")
    device = next(module.parameters()).device
    inter = np.zeros(num_classes, np.int64)
    pred_count = np.zeros(num_classes, np.int64)
    true_count = np.zeros(num_classes, np.int64)
    with evaluating(module):
        for s in range(0, len(images), batch_size):
            pred = module(normalize(images[s : s + batch_size].to(device), list(mean), list(std))).argmax(1).cpu()
            truth = torch.from_numpy(
                np.stack([resize_nearest(t, tuple(pred.shape[-2:])) for t in targets[s : s + batch_size].numpy()])
            )
            pred_count += np.bincount(pred.flatten().numpy(), minlength=num_classes)
            true_count += np.bincount(truth.flatten().numpy(), minlength=num_classes)
            inter += np.bincount(truth[pred == truth].numpy(), minlength=num_classes)
    union = pred_count + true_count - inter
    iou = [float(inter[c] / union[c]) if union[c] else None for c in range(num_classes)]
    present = [v for v in iou[1:] if v is not None]
    total = int(true_count.sum())
    return {
        "pixel_accuracy": float(inter.sum() / total),
        "miou": float(np.mean(present)) if present else 0.0,
        "iou": iou,
        "pixel_share": (true_count / total).tolist(),
        "predicted_share": (pred_count / total).tolist(),
    }


def _degrade(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Blur (3 x 3 box, half the images) and Gaussian noise (sigma up to 8% of the range) on [B, 3, H, W] in 0..255."""
    n = len(x)
    blur = (torch.rand(n, generator=rng) < 0.5).view(-1, 1, 1, 1).to(x.device)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur, blurred, x)
    sigma = (torch.rand(n, generator=rng) * 0.08 * 255.0).view(-1, 1, 1, 1).to(x.device)
    return (x + sigma * torch.randn(x.shape, generator=rng).to(x.device)).clamp_(0.0, 255.0)


def train_segmenter(
    dataset: ConceptDataset,
    *,
    category: str = "object",
    val_dataset: ConceptDataset | None = None,
    val_fraction: float = 0.1,
    epochs: int = 8,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    augment: bool = True,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[nn.Module, dict]:
    """Train :func:`dissect_core.archs.segnet` on the per-pixel labels of one category.

    The network's scores (a quarter of the image size) are upsampled bilinearly
    to the mask resolution (half the image size in Broden) inside the loss, so
    small objects that nearest reduction of the masks would drop still teach
    it. Cross-entropy, Adam with a one-cycle schedule (peak ``lr``), random
    horizontal flips; with ``augment`` also random blur and pixel noise, so
    that it labels the blurrier, noisier images of a small GAN as it labels
    the real ones.

    Args:
        dataset: training images with masks.
        category: the category whose concepts become the classes (class 0 =
            no concept of it).
        val_dataset: validation images; None holds out ``val_fraction`` of ``dataset``.
        val_fraction: the held-out share when ``val_dataset`` is None (0 for none).
        epochs: passes over the training images.
        batch_size: minibatch size.
        lr: peak learning rate.
        seed: seeds initialisation, the hold-out, shuffling and augmentation.
        augment: blur half the training images and add noise of random strength (flips always).
        device: where to train.
        threads: CPU intra-op threads while training (restored afterwards);
            None keeps the caller's setting (see :func:`train_gan`).
        progress: called with one line of text per epoch, or None.
        should_stop: polled every step; True raises
            :class:`~dissect_core.errors.Cancelled`.

    Returns:
        (module, info): the segmenter in eval mode on ``device``, mapping
        normalised float [B, 3, H, W] to scores [B, L, H/4, W/4]; and a dict
        with ``arch`` (``"builtin:segnet"``), ``num_classes`` (L), ``labels``
        (L names, ``labels[0] == "-"``), ``categories`` (L, ``categories[0] ==
        "-"``), ``category``, ``mean``, ``std``, ``input_size`` [H, W],
        ``val_pixel_accuracy``, ``val_miou``, ``val_iou`` (per label, None
        where absent), ``val_images``, ``train_images``, ``epochs``, ``seed``,
        ``seconds`` (validation figures are None without validation images; see
        :func:`evaluate_segmentation` for how they are measured).

    Raises:
        DatasetError: see :func:`load_category_arrays`.
        Cancelled: ``should_stop`` said so.
    """
    with _cpu_threads(threads):
        start = time.monotonic()
        images, targets, labels = load_category_arrays(dataset, category)
        rng = torch.Generator().manual_seed(seed)
        if val_dataset is not None:
            val_images, val_targets, val_labels = load_category_arrays(val_dataset, category)
            if val_labels != labels:
                raise DatasetError(
                    f"validation dataset {val_dataset.name} has other {category} concepts "
                    f"({val_labels[1:]}) than {dataset.name} ({labels[1:]})",
                    path="",
                )
        else:
            order = torch.randperm(len(images), generator=rng)
            n_val = round(len(images) * val_fraction) if len(images) > 1 else 0
            val_idx, train_idx = order[:n_val], order[n_val:]
            val_images, val_targets = images[val_idx], targets[val_idx]
            images, targets = images[train_idx], targets[train_idx]

        flat = images.float().div_(255.0).transpose(0, 1).reshape(3, -1)
        mean = flat.mean(1).tolist()
        std = flat.std(1).clamp_min(1e-3).tolist()
        del flat

        device = torch.device(device)
        num_classes = len(labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = segnet(num_classes)
        model.to(device)
        steps_per_epoch = math.ceil(len(images) / batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.2
        )
        mask_size = tuple(targets.shape[-2:])
        val: dict | None = None
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(images), generator=rng)
            total_loss = 0.0
            for step in range(steps_per_epoch):
                check_stop(should_stop, "segmenter training")
                idx = order[step * batch_size : (step + 1) * batch_size]
                flip = (torch.rand(len(idx), generator=rng) < 0.5).view(-1, 1, 1, 1)
                x = torch.where(flip, images[idx].flip(3), images[idx])
                y = torch.where(flip[:, 0], targets[idx].flip(2), targets[idx])
                x = x.to(device).float()
                if augment:
                    x = _degrade(x, rng)
                scores = _scores_at(model(normalize(x, mean, std)), mask_size)
                loss = F.cross_entropy(scores, y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += float(loss.detach()) * len(idx)
            line = f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(images):.3f}"
            if len(val_images) and (epoch == epochs - 1 or progress is not None):
                val = evaluate_segmentation(model, val_images, val_targets, num_classes, mean, std)
                line += f" val pixel acc {val['pixel_accuracy']:.3f} mIoU {val['miou']:.3f}"
            if progress is not None:
                progress(line)
        model.eval()
        cat_of = {c.name: c.category for c in dataset.concepts if c.category == category}
        info = {
            "arch": "builtin:segnet",
            "num_classes": num_classes,
            "labels": labels,
            "categories": ["-"] + [cat_of[name] for name in labels[1:]],
            "category": category,
            "mean": mean,
            "std": std,
            "input_size": list(dataset.image_size),
            "val_pixel_accuracy": val["pixel_accuracy"] if val else None,
            "val_miou": val["miou"] if val else None,
            "val_iou": val["iou"] if val else None,
            "val_images": len(val_images),
            "train_images": len(images),
            "epochs": epochs,
            "seed": seed,
            "seconds": time.monotonic() - start,
        }
        return model, info

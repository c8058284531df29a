"""The demo: a synthetic Broden dataset, and a scene classifier, a GAN and a segmenter trained on it.

:func:`make_demo` writes, under ``out_dir``::

    data/                    synthetic scenes in Broden layout (dissect with broden:DIR)
    classifier.safetensors   the scenecnn state_dict
    classifier.json          arch "builtin:scenecnn", num_classes, classes,
                             input_size, mean, std, val_accuracy, ...
    generator.safetensors    the DCGAN generator's state_dict (dissect_core.gan)
    generator.json           arch "builtin:dcgan", latent_dim, output_range [-1, 1],
                             output_size, layer, steps, train_seconds, ...
    segmenter.safetensors    the segnet state_dict: per-pixel object classes
    segmenter.json           arch "builtin:segnet", num_classes, labels, categories
                             (one per label, index 0 "-"), mean, std, input_size,
                             val_pixel_accuracy, val_miou, val_iou, ...

Each step is skipped when its output exists (unless ``force``). The classifier
defaults (3,000 64x64 images, 10 epochs) take about a minute and a half on two CPU
cores and give a classifier well above chance (6 classes) whose ``conv5`` holds
object-detector units. The generator half (``generator``, ``segmenter``) takes
about six and a half minutes more on two idle cores (measured 2026-11-30: GAN
257 s, segmenter 139 s). Both train on :data:`DEMO_TRAIN_THREADS` threads
(``threads``): the weights depend on the thread count, so it is fixed rather than
taken from the machine, and recorded; on a machine busy with other work one
thread is much faster than two waiting on each other (``make-demo --threads 1``).
Callers that only need the classifier switch the generator half off.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .broden import BrodenDataset
from .synthetic import generate
from .train import train_classifier

__all__ = [
    "DEMO_ACTIVATION_L1",
    "DEMO_ARCH",
    "DEMO_GAN_STEPS",
    "DEMO_GENERATOR_ARCH",
    "DEMO_GENERATOR_LAYER",
    "DEMO_LAYER",
    "DEMO_SEGMENTER_ARCH",
    "DEMO_SEGMENTER_EPOCHS",
    "DEMO_TRAIN_THREADS",
    "DemoPaths",
    "make_demo",
]

DEMO_ARCH = "builtin:scenecnn"
DEMO_LAYER = "conv5"
DEMO_GENERATOR_ARCH = "builtin:dcgan"
DEMO_GENERATOR_LAYER = "layer3"
DEMO_SEGMENTER_ARCH = "builtin:segnet"
DEMO_GAN_STEPS = 2500
DEMO_SEGMENTER_EPOCHS = 8
DEMO_TRAIN_THREADS = 2
# Weight of the L1 penalty on conv5's mean activation while training the demo classifier
# (dissect_core.train.train_classifier): it makes conv5 sparse like VGG-16's conv5_3, so that a
# class's 20 most important units carry it (Figure 2d). The README's "Classifier roles" has the
# measured trade-off (sparser layers: the ablation result holds better, fewer units are labelled).
DEMO_ACTIVATION_L1 = 3.0


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo's files are.

    Attributes:
        root: the demo directory.
        data: the Broden directory of synthetic scenes.
        weights: the classifier's safetensors file.
        config: the classifier's JSON description.
        generator: the GAN generator's safetensors file.
        generator_config: the generator's JSON description.
        segmenter: the segmenter's safetensors file.
        segmenter_config: the segmenter's JSON description.
    """

    root: Path
    data: Path
    weights: Path
    config: Path
    generator: Path
    generator_config: Path
    segmenter: Path
    segmenter_config: Path


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_demo(
    out_dir: str | os.PathLike[str],
    *,
    n_images: int = 3000,
    seed: int = 0,
    epochs: int = 10,
    generator: bool = True,
    segmenter: bool = True,
    gan_steps: int = DEMO_GAN_STEPS,
    segmenter_epochs: int = DEMO_SEGMENTER_EPOCHS,
    threads: int = DEMO_TRAIN_THREADS,
    force: bool = False,
    progress: Callable[[str], None] | None = print,
) -> DemoPaths:
    """Generate the synthetic dataset and train the demo models, if missing.

    Args:
        out_dir: the demo directory (created if needed).
        n_images: synthetic scenes to generate (about 20% go to "val").
        seed: seeds the scenes and the training.
        epochs: classifier training epochs.
        generator: train the GAN (:func:`dissect_core.gan.train_gan`) on the
            "train" split, if missing.
        segmenter: train the object segmenter
            (:func:`dissect_core.gan.train_segmenter`), if missing.
        gan_steps: GAN generator updates.
        segmenter_epochs: segmenter training epochs.
        threads: CPU intra-op threads for the GAN and segmenter training
            (restored afterwards). The weights depend on it (and on the seed
            and the device), so it is recorded in their JSON.
        force: regenerate the data and retrain even if present (only the
            models switched on).
        progress: called with one line of text per step and epoch, or None.

    Returns:
        The :class:`DemoPaths`.
    """
    say = progress or (lambda _line: None)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = DemoPaths(
        root=root,
        data=root / "data",
        weights=root / "classifier.safetensors",
        config=root / "classifier.json",
        generator=root / "generator.safetensors",
        generator_config=root / "generator.json",
        segmenter=root / "segmenter.safetensors",
        segmenter_config=root / "segmenter.json",
    )

    if force or not (paths.data / "index.csv").is_file():
        if paths.data.exists():
            shutil.rmtree(paths.data)
        start = time.monotonic()
        say(f"generating {n_images} synthetic scenes in {paths.data}")
        generate(paths.data, n_images=n_images, seed=seed)
        say(f"generated in {time.monotonic() - start:.1f}s")

    if force or not paths.weights.is_file() or not paths.config.is_file():
        train = BrodenDataset(paths.data, split="train")
        val = BrodenDataset(paths.data, split="val")
        say(f"training {DEMO_ARCH} on {len(train)} images ({len(val)} for validation)")
        model, info = train_classifier(
            train,
            val_dataset=val,
            arch=DEMO_ARCH,
            epochs=epochs,
            seed=seed,
            activation_l1=DEMO_ACTIVATION_L1,
            l1_layer=DEMO_LAYER,
            progress=say,
        )
        config = _description(
            DEMO_ARCH,
            info,
            ("num_classes", "classes", "input_size", "mean", "std"),
            paths,
            val_accuracy=info["val_accuracy"][-1] if info["val_accuracy"] else None,
            train_accuracy=info["train_accuracy"][-1] if info["train_accuracy"] else None,
            val_accuracy_per_epoch=info["val_accuracy"],
            epochs=epochs,
            seed=seed,
            activation_l1=info["activation_l1"],
            l1_layer=info["l1_layer"],
            layer=DEMO_LAYER,
        )
        _save_model(paths.weights, paths.config, model, config)
        say(f"trained in {info['seconds']:.1f}s, validation accuracy {config['val_accuracy']:.3f}")

    if generator and (force or not paths.generator.is_file() or not paths.generator_config.is_file()):
        _make_generator(paths, seed=seed, steps=gan_steps, threads=threads, say=say)
    if segmenter and (force or not paths.segmenter.is_file() or not paths.segmenter_config.is_file()):
        _make_segmenter(paths, seed=seed, epochs=segmenter_epochs, threads=threads, say=say)
    return paths


def _description(arch: str, info: dict, copied: Sequence[str], paths: DemoPaths, **fields: Any) -> dict[str, Any]:
    """A trained demo model's JSON description.

    Args:
        arch: its architecture (``builtin:NAME``).
        info: the trainer's info dict.
        copied: the info entries the description repeats.
        paths: the demo's paths.
        fields: more entries, in order.

    Returns:
        ``arch``, the ``copied`` entries, ``fields``, then where and how it was
        trained: ``dataset``, ``train_seconds`` and the ``torch`` version.
    """
    return {
        "arch": arch,
        **{key: info[key] for key in copied},
        **fields,
        "dataset": f"broden:{paths.data}",
        "train_seconds": round(info["seconds"], 1),
        "torch": torch.__version__,
    }


def _save_model(weights: Path, config_path: Path, module: torch.nn.Module, config: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    _write_atomic(weights, lambda p: save_file(state, str(p)))
    _write_atomic(config_path, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def _make_generator(paths: DemoPaths, *, seed: int, steps: int, threads: int, say: Callable[[str], None]) -> None:
    from .gan import train_gan

    train = BrodenDataset(paths.data, split="train")
    say(f"training the {DEMO_GENERATOR_ARCH} GAN on {len(train)} images ({steps} steps)")
    module, info = train_gan(train, arch=DEMO_GENERATOR_ARCH, steps=steps, seed=seed, threads=threads, progress=say)
    config = _description(
        DEMO_GENERATOR_ARCH,
        info,
        ("latent_dim", "steps", "batch_size", "loss_d", "loss_g"),
        paths,
        output_range=[-1, 1],
        output_size=list(train.image_size),
        layer=DEMO_GENERATOR_LAYER,
        seed=seed,
        threads=threads,
    )
    _save_model(paths.generator, paths.generator_config, module, config)
    say(f"trained the GAN in {info['seconds']:.1f}s")


def _make_segmenter(paths: DemoPaths, *, seed: int, epochs: int, threads: int, say: Callable[[str], None]) -> None:
    from .gan import train_segmenter

    train = BrodenDataset(paths.data, split="train")
    val = BrodenDataset(paths.data, split="val")
    say(f"training the {DEMO_SEGMENTER_ARCH} object segmenter on {len(train)} images ({len(val)} for validation)")
    module, info = train_segmenter(
        train, val_dataset=val, category="object", epochs=epochs, seed=seed, threads=threads, progress=say
    )
    config = _description(
        DEMO_SEGMENTER_ARCH,
        info,
        (
            "num_classes",
            "labels",
            "categories",
            "mean",
            "std",
            "input_size",
            "val_pixel_accuracy",
            "val_miou",
            "val_iou",
        ),
        paths,
        epochs=epochs,
        seed=seed,
        threads=threads,
    )
    _save_model(paths.segmenter, paths.segmenter_config, module, config)
    say(
        f"trained the segmenter in {info['seconds']:.1f}s, validation pixel accuracy "
        f"{info['val_pixel_accuracy']:.3f}, mIoU {info['val_miou']:.3f}"
    )

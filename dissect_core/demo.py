"""The demo: a synthetic Broden dataset and a scene classifier trained on it.

:func:`make_demo` writes, under ``out_dir``::

    data/                    synthetic scenes in Broden layout (dissect with broden:DIR)
    classifier.safetensors   the scenecnn state_dict
    classifier.json          arch "builtin:scenecnn", num_classes, classes,
                             input_size, mean, std, val_accuracy, ...

Each step is skipped when its output exists (unless ``force``). The defaults
(3,000 64x64 images, 10 epochs) take about a minute on two CPU cores and give a
classifier well above chance (6 classes) whose ``conv5`` holds object-detector
units.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .broden import BrodenDataset
from .synthetic import generate
from .train import train_classifier

__all__ = ["DEMO_ARCH", "DEMO_LAYER", "DemoPaths", "make_demo"]

DEMO_ARCH = "builtin:scenecnn"
DEMO_LAYER = "conv5"


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo's files are.

    Attributes:
        root: the demo directory.
        data: the Broden directory of synthetic scenes.
        weights: the classifier's safetensors file.
        config: the classifier's JSON description.
    """

    root: Path
    data: Path
    weights: Path
    config: Path


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
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
    force: bool = False,
    progress: Callable[[str], None] | None = print,
) -> DemoPaths:
    """Generate the synthetic dataset and train the demo classifier, if missing.

    Args:
        out_dir: the demo directory (created if needed).
        n_images: synthetic scenes to generate (about 20% go to "val").
        seed: seeds the scenes and the training.
        epochs: training epochs.
        force: regenerate the data and retrain even if present.
        progress: called with one line of text per step and epoch, or None.

    Returns:
        The :class:`DemoPaths`.
    """
    say = progress or (lambda _line: None)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = DemoPaths(root=root, data=root / "data", weights=root / "classifier.safetensors",
                      config=root / "classifier.json")

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
        model, info = train_classifier(train, val_dataset=val, arch=DEMO_ARCH, epochs=epochs, seed=seed,
                                       progress=say)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        config = {
            "arch": DEMO_ARCH,
            "num_classes": info["num_classes"],
            "classes": info["classes"],
            "input_size": info["input_size"],
            "mean": info["mean"],
            "std": info["std"],
            "val_accuracy": info["val_accuracy"][-1] if info["val_accuracy"] else None,
            "train_accuracy": info["train_accuracy"][-1] if info["train_accuracy"] else None,
            "val_accuracy_per_epoch": info["val_accuracy"],
            "epochs": epochs,
            "seed": seed,
            "layer": DEMO_LAYER,
            "dataset": f"broden:{paths.data}",
            "train_seconds": round(info["seconds"], 1),
            "torch": torch.__version__,
        }
        _write_atomic(paths.weights, lambda p: save_file(state, str(p)))
        _write_atomic(paths.config, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
        say(f"trained in {info['seconds']:.1f}s, validation accuracy {config['val_accuracy']:.3f}")
    return paths

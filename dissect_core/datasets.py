"""Open a concept dataset from a spec string.

Specs:

- ``broden:DIR``: a Broden directory (:class:`~dissect_core.broden.BrodenDataset`).
- ``imagefolder:DIR``: an image folder with optional masks
  (:class:`~dissect_core.imagefolder.ImageFolderDataset`).
- ``synthetic:DIR``: a generated synthetic directory (it is Broden).
- ``synthetic:N`` or ``synthetic:N:SEED``: N synthetic scenes rendered in
  memory (:class:`~dissect_core.synthetic.SyntheticScenes`, seed 0 by default).
"""

from __future__ import annotations

import re
from pathlib import Path

from .broden import BrodenDataset
from .colors import WithColorConcepts
from .concepts import ConceptDataset, size_pair
from .errors import DatasetError
from .imagefolder import ImageFolderDataset
from .parts import WithPartConcepts
from .synthetic import DEFAULT_IMAGE_SIZE, SyntheticScenes

__all__ = ["SCHEMES", "open_dataset"]

SCHEMES: tuple[str, ...] = ("broden", "imagefolder", "synthetic")

_IN_MEMORY = re.compile(r"^(\d+)(?::(\d+))?$")


def _directory(spec: str, rest: str) -> Path:
    if not rest:
        raise DatasetError(f"dataset spec {spec!r} names no directory", path="")
    path = Path(rest).expanduser()
    if not path.is_dir():
        raise DatasetError(f"dataset directory {path} does not exist (from spec {spec!r})", path=str(path))
    return path


def open_dataset(
    spec: str,
    *,
    split: str | None = None,
    max_images: int | None = None,
    colors: bool = False,
    parts: bool = False,
    image_size: tuple[int, int] | None = None,
) -> ConceptDataset:
    """Open a dataset from a spec (see the module docstring).

    Args:
        spec: ``SCHEME:ARG``.
        split: keep only this split ("train", "val"); image folders have no
            splits and refuse a split.
        max_images: keep at most this many images.
        colors: add the colour-name concepts (skipped when the dataset has
            them already).
        parts: add the paper's object-part concepts (``obj-t`` etc.); applied
            before the colours.
        image_size: (H, W) to resize images to (synthetic: render at it).

    Returns:
        The dataset.

    Raises:
        DatasetError: an unknown scheme, a missing directory, or a malformed dataset.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in SCHEMES:
        raise DatasetError(
            f"unknown dataset spec {spec!r}: expected one of "
            + ", ".join(f"{s}:..." for s in SCHEMES)
            + " (broden:DIR, imagefolder:DIR, synthetic:DIR, synthetic:N[:SEED])",
            path="",
        )
    dataset: ConceptDataset
    if scheme == "synthetic" and (m := _IN_MEMORY.match(rest)):
        n, seed = int(m.group(1)), int(m.group(2) or 0)
        if n < 1:
            raise DatasetError(f"dataset spec {spec!r}: the number of images must be positive", path="")
        try:
            dataset = SyntheticScenes(
                n, seed, size_pair(image_size) if image_size else DEFAULT_IMAGE_SIZE, split=split, max_images=max_images
            )
        except ValueError as exc:
            raise DatasetError(f"dataset spec {spec!r}: {exc}", path="") from None
    elif scheme in ("broden", "synthetic"):
        dataset = BrodenDataset(_directory(spec, rest), split=split, image_size=image_size, max_images=max_images)
    else:
        if split is not None:
            raise DatasetError(f"image folder {rest} has no splits (asked for split {split!r})", path=rest)
        dataset = ImageFolderDataset(_directory(spec, rest), image_size=image_size, max_images=max_images)
    if len(dataset) == 0:
        raise DatasetError(f"dataset {spec!r} has no images" + (f" in split {split!r}" if split else ""), path=rest)
    if parts:
        dataset = WithPartConcepts(dataset)
    if colors:
        dataset = WithColorConcepts(dataset)
    return dataset

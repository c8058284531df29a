"""A plain folder of images with optional label masks.

Layout::

    DIR/images/NAME.png | NAME.jpg | NAME.jpeg     the images (sorted by name)
    DIR/masks/NAME.png                            one label map per image, or
    DIR/masks/NAME_<category>.png                 one label map per category
    DIR/labels.json | DIR/labels.csv              the label map (needed with masks)

Mask PNGs use the Broden encoding (label = R + 256 * G, 0 = unlabelled;
single-channel PNGs hold the number directly). ``labels.json`` is a list of
``{"number": 1, "name": "tree", "category": "object"}`` objects (or an object
``{"labels": [...]}``); ``labels.csv`` has the header ``number,name,category``.
A missing category means ``"object"``. Label numbers need not be dense; they are
renumbered densely in number order, keeping names.

Without a ``masks/`` folder every sample has no label maps (K = 0): such a
folder is meant for computed concepts (colour names, a segmenter). An image
without any mask file has K = 0 as well. For ``NAME_<category>.png`` masks the
label maps come in the label file's category order; an exact ``NAME.png`` comes
first.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .broden import MAX_IMAGE_PIXELS, mask_concepts, read_label_png, read_rgb
from .concepts import Concept, ConceptDataset, Sample, size_pair
from .errors import DatasetError

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataset"]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def _image_size_of(path: Path) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"image {path} is too large (decompression bomb): {exc}", path=str(path)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image {path} cannot be decoded: {exc}", path=str(path)) from None
    if w * h > MAX_IMAGE_PIXELS:
        raise DatasetError(f"image {path} is {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS}", path=str(path))
    return h, w


def _read_label_file(root: Path) -> list[tuple[int, str, str]] | None:
    json_path, csv_path = root / "labels.json", root / "labels.csv"
    entries: list[tuple[int, str, str]] = []
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"label file {json_path} cannot be read: {exc}", path=str(json_path)) from None
        if isinstance(data, dict):
            data = data.get("labels")
        if not isinstance(data, list):
            raise DatasetError(f"label file {json_path} must hold a list of labels", path=str(json_path))
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "number" not in item or "name" not in item:
                raise DatasetError(f"label file {json_path}: entry {i} needs 'number' and 'name'", path=str(json_path))
            try:
                number = int(item["number"])
            except (TypeError, ValueError):
                raise DatasetError(
                    f"label file {json_path}: entry {i} has a non-integer number", path=str(json_path)
                ) from None
            entries.append((number, str(item["name"]), str(item.get("category") or "object")))
        path = json_path
    elif csv_path.is_file():
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DatasetError(f"label file {csv_path} cannot be read: {exc}", path=str(csv_path)) from None
        for line, r in enumerate(rows, start=2):
            if not r.get("number") or not r.get("name"):
                raise DatasetError(f"label file {csv_path} line {line}: needs number and name", path=str(csv_path))
            try:
                number = int(r["number"])
            except ValueError:
                raise DatasetError(
                    f"label file {csv_path} line {line}: number {r['number']!r} is not an integer", path=str(csv_path)
                ) from None
            entries.append((number, r["name"].strip(), (r.get("category") or "object").strip()))
        path = csv_path
    else:
        return None
    entries = [e for e in entries if e[0] != 0]
    numbers = [e[0] for e in entries]
    if any(n < 0 for n in numbers) or len(set(numbers)) != len(numbers):
        raise DatasetError(f"label file {path}: numbers must be positive and distinct", path=str(path))
    if not entries:
        raise DatasetError(f"label file {path} lists no labels", path=str(path))
    return sorted(entries)


class ImageFolderDataset(ConceptDataset):
    """An image folder with optional masks (see the module docstring for the layout).

    Args:
        root: the folder.
        image_size: (H, W) every image is resized to (bilinear); default the
            size of the first image.
        mask_size: (sh, sw) every mask is resized to (nearest); default the
            size of the first mask, or half the image size without masks.
        max_images: keep at most this many images (the first by name).

    Attributes:
        image_names: the file name of every image.

    Raises:
        DatasetError: naming the offending file.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: tuple[int, int] | None = None,
        mask_size: tuple[int, int] | None = None,
        max_images: int | None = None,
    ) -> None:
        self.root = Path(root)
        images_dir = self.root / "images"
        if not images_dir.is_dir():
            raise DatasetError(f"image folder {self.root} has no images/ directory", path=str(images_dir))
        self.name = self.root.name
        self.classes = []
        files = sorted(
            e.name for e in os.scandir(images_dir) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
        )
        if max_images is not None:
            files = files[:max_images]
        if not files:
            raise DatasetError(f"{images_dir} holds no .png/.jpg images", path=str(images_dir))
        self.image_names = files
        self._images = [images_dir / f for f in files]

        labels = _read_label_file(self.root)
        masks_dir = self.root / "masks"
        has_masks = masks_dir.is_dir()
        if has_masks and labels is None:
            raise DatasetError(f"{self.root} has masks/ but no labels.json or labels.csv", path=str(self.root))
        labels = labels or []
        self.concepts = [Concept(i + 1, name, cat) for i, (_, name, cat) in enumerate(labels)]
        self.categories = []
        for c in self.concepts:
            if c.category not in self.categories:
                self.categories.append(c.category)
        self._lut = np.full(1 << 16, -1, np.int32)
        self._lut[0] = 0
        self._dense = {}
        for i, (n, _, _) in enumerate(labels):
            self._dense[n] = i + 1
            if n < len(self._lut):
                self._lut[n] = i + 1

        self._masks: list[list[Path]] = [[] for _ in files]
        if has_masks:
            present = {e.name for e in os.scandir(masks_dir) if e.is_file()}
            for i, f in enumerate(files):
                stem = Path(f).stem
                found = []
                if f"{stem}.png" in present:
                    found.append(masks_dir / f"{stem}.png")
                for cat in self.categories:
                    if f"{stem}_{cat}.png" in present:
                        found.append(masks_dir / f"{stem}_{cat}.png")
                self._masks[i] = found

        self.image_size = size_pair(image_size) if image_size else _image_size_of(self._images[0])
        if mask_size:
            self.mask_size = size_pair(mask_size)
        else:
            first_mask = next((m[0] for m in self._masks if m), None)
            if first_mask is not None:
                self.mask_size = _image_size_of(first_mask)
            else:
                self.mask_size = (max(1, self.image_size[0] // 2), max(1, self.image_size[1] // 2))

    def __len__(self) -> int:
        return len(self._images)

    def _read_mask(self, path: Path) -> np.ndarray:
        return mask_concepts(read_label_png(path), self._lut, path, "the label file", self.mask_size)

    def __getitem__(self, index: int) -> Sample:
        index = self._checked_index(index)
        image = read_rgb(self._images[index], size=self.image_size)
        maps = [self._read_mask(m) for m in self._masks[index]]
        label_maps = np.stack(maps).astype(np.int32) if maps else np.zeros((0, *self.mask_size), np.int32)
        return Sample(image=image, label_maps=label_maps)

    def validate(self, full: bool = False) -> int:
        """Check every image and mask file.

        Args:
            full: also decode every file and check mask label numbers.

        Returns:
            The number of files checked.

        Raises:
            DatasetError: naming the first bad file.
        """
        count = 0
        for image, masks in zip(self._images, self._masks, strict=True):
            for path in (image, *masks):
                if not path.is_file():
                    raise DatasetError(f"file {path} does not exist", path=str(path))
                count += 1
            if full:
                read_rgb(image)
                for m in masks:
                    self._read_mask(m)
        return count

"""Broden datasets: the NetDissect directory layout, read and written.

Layout (as the NetDissect releases lay it out)::

    ROOT/index.csv       image,split,ih,iw,sh,sw,<category columns...>
    ROOT/label.csv       number,name,category,frequency,coverage,syns
    ROOT/category.csv    name,first,last,count,frequency          (optional)
    ROOT/c_<cat>.csv     code,number,name,frequency,coverage      (optional)
    ROOT/images/...      images and mask PNGs, paths relative to images/

A category cell of ``index.csv`` holds ``;``-joined mask file names (per-pixel
labels, label number = R + 256 * G of the PNG, 0 = unlabelled) or decimal label
numbers (whole-image labels such as scene or texture), or nothing. The category
cell of ``label.csv`` is written ``cat(freq)[;cat2(freq2)]``.

Reading rules (see :class:`BrodenDataset`):

- Concept numbers are label.csv numbers when those are dense 1..N (as in
  Broden); otherwise they are renumbered densely in label-number order, keeping
  names.
- Each concept gets one category: the category of the ``index.csv`` column in
  which it occurs as a whole-image label (so scene labels are ``scene``); else
  the category listed in its label.csv cell with the highest frequency (ties:
  the first listed), which is how the reference picks a label's primary
  category; else the first ``c_<cat>.csv`` that lists it; else ``"unknown"``.
- Each mask file of a row becomes one label map, in column order and then in
  cell order; whole-image labels become ``Sample.image_labels`` in the same
  order.
- Scene classes are the concepts of category ``scene`` in number order, named
  without a trailing ``-s``; a sample's ``class_label`` is the class of its
  first scene label (-1 when it has none).
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from .concepts import Concept, ConceptDataset, Sample, size_pair
from .errors import DatasetError

__all__ = [
    "INDEX_COLUMNS",
    "MAX_IMAGE_PIXELS",
    "BrodenDataset",
    "mask_concepts",
    "read_label_png",
    "read_rgb",
    "resize_nearest",
    "write_broden",
    "write_label_png",
]

MAX_IMAGE_PIXELS = 1 << 26

INDEX_COLUMNS: tuple[str, ...] = ("image", "split", "ih", "iw", "sh", "sw")

_CATEGORY_ITEM = re.compile(r"^\s*([^()]+?)\s*(?:\(\s*(\d+)\s*\))?\s*$")
_SAFE_CATEGORY = re.compile(r"^[A-Za-z0-9_\-]+$")
_MASK_LUT_SIZE = 1 << 16


def _open_checked(path: Path, kind: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DatasetError(
                    f"{kind} {path} is {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS} "
                    "(possible decompression bomb)",
                    path=str(path),
                )
            im.load()
            return im
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{kind} {path} does not exist", path=str(path)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"{kind} {path} is too large (decompression bomb): {exc}", path=str(path)) from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise DatasetError(f"{kind} {path} cannot be decoded: {exc}", path=str(path)) from None


def read_rgb(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file as RGB, refusing oversized (decompression-bomb) files.

    Args:
        path: image file (any format PIL reads).
        size: (H, W) to resize to with bilinear filtering, or None for the
            file's own size.

    Returns:
        uint8 array [H, W, 3].

    Raises:
        DatasetError: the file is missing, undecodable, or over
            :data:`MAX_IMAGE_PIXELS` pixels.
    """
    path = Path(path)
    im = _open_checked(path, "image")
    try:
        im = im.convert("RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise DatasetError(f"image {path} cannot be decoded: {exc}", path=str(path)) from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_rgb8_png(path: str | os.PathLike[str]) -> np.ndarray | None:
    """uint8 [h, w, 3] of an 8-bit RGB, non-interlaced PNG, or None for anything else.

    Broden masks are thousands of tiny PNGs, where PIL's per-file machinery
    (format detection, chunk objects) costs more than the decoding: here the
    chunks are walked directly (every CRC checked) and the image stream is
    inflated and unfiltered by PIL's own PNG ("zip") decoder. Any file this does
    not take, or cannot decode, returns None and goes through PIL, which gives
    the error message.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, size, idat = len(_PNG_SIGNATURE), None, []
    while True:
        if pos + 12 > len(data):
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(data[pos + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            return None
        if kind == b"IHDR":
            if length != 13:
                return None
            w, h, depth, color, _, _, interlace = struct.unpack_from(">IIBBBBB", data, pos + 8)
            if (depth, color, interlace) != (8, 2, 0) or not 0 < w * h <= MAX_IMAGE_PIXELS:
                return None
            size = (w, h)
        elif kind == b"IDAT":
            idat.append(data[pos + 8 : end])
        elif kind == b"IEND":
            break
        pos = end + 4
    if size is None or not idat:
        return None
    try:
        im = Image.frombytes("RGB", size, b"".join(idat), "zip", "RGB", 0)
        return np.frombuffer(im.tobytes(), np.uint8).reshape(size[1], size[0], 3)
    except (OSError, ValueError, TypeError):
        return None


def _rgb_labels(rgb: np.ndarray) -> np.ndarray:
    """int32 label numbers R + 256 * G of a uint8 [h, w, 3+] mask."""
    labels = rgb[..., 1].astype(np.int32)
    labels <<= 8
    labels |= rgb[..., 0]
    return labels


def read_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a label mask PNG.

    RGB(A) masks encode label = R + 256 * G (Broden); single-channel masks
    (modes L, I, I;16) hold the label number directly; palette masks are read
    as RGB.

    Args:
        path: mask file.

    Returns:
        int32 array [h, w] of label numbers (0 = unlabelled).

    Raises:
        DatasetError: the file is missing, undecodable or oversized.
    """
    rgb = _read_rgb8_png(path)
    if rgb is not None:
        return _rgb_labels(rgb)
    path = Path(path)
    im = _open_checked(path, "mask")
    try:
        if im.mode in ("L", "I", "I;16", "I;16B", "I;16L"):
            return np.asarray(im).astype(np.int32)
        return _rgb_labels(np.asarray(im if im.mode in ("RGB", "RGBA") else im.convert("RGB")))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"mask {path} cannot be decoded: {exc}", path=str(path)) from None


def write_label_png(path: str | os.PathLike[str], labels: np.ndarray) -> None:
    """Write a label map as a Broden mask PNG (R = n % 256, G = n // 256, B = 0).

    Args:
        path: output file.
        labels: int array [h, w] with values in 0..65535.
    """
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= _MASK_LUT_SIZE:
        raise ValueError("mask labels must lie in 0..65535")
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb, "RGB").save(path, compress_level=1)


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map, sampling at pixel centres.

    Args:
        labels: array [h, w].
        size: target (H, W).

    Returns:
        array [H, W] of the same dtype; target pixel t reads source pixel
        floor((t + 0.5) * h / H).
    """
    h, w = labels.shape
    th, tw = size
    if (h, w) == (th, tw):
        return labels
    rows = np.minimum(((np.arange(th) + 0.5) * h / th).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def mask_concepts(
    labels: np.ndarray, lut: np.ndarray, path: str | os.PathLike[str], table: str, size: tuple[int, int]
) -> np.ndarray:
    """A mask's label numbers as concept numbers, at a dataset's mask size.

    Args:
        labels: int [h, w], the mask's label numbers (:func:`read_label_png`).
        lut: int [65536], the concept number of each label number (-1: not a
            concept of the dataset; 0 for 0).
        path: the mask file (for errors).
        table: the file that lists the dataset's labels (for errors).
        size: the dataset's mask size (sh, sw).

    Returns:
        [sh, sw] concept numbers in ``lut``'s dtype (:func:`resize_nearest`).

    Raises:
        DatasetError: a label number outside 0..65535 or not in the table.
    """
    try:
        dense = lut[labels]  # labels >= 65536 raise here, negative ones would wrap
    except IndexError:
        dense = None
    if dense is None or labels.min(initial=0) < 0:
        raise DatasetError(f"mask {path} holds label numbers outside 0..65535", path=str(path))
    if dense.min(initial=0) < 0:
        bad = sorted(set(np.unique(labels[dense < 0]).tolist()))[:10]
        raise DatasetError(f"mask {path} holds label numbers not in {table}: {bad}", path=str(path))
    return resize_nearest(dense, size)


@dataclass(frozen=True)
class _Row:
    image: str
    split: str
    mask_size: tuple[int, int]
    masks: tuple[str, ...]
    image_labels: tuple[int, ...]


def _read_csv(path: Path, what: str) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise DatasetError(f"{what} {path} is missing", path=str(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{what} {path} cannot be read: {exc}", path=str(path)) from None
    if not rows:
        raise DatasetError(f"{what} {path} is empty", path=str(path))
    return [h.strip() for h in rows[0]], [r for r in rows[1:] if any(c.strip() for c in r)]


def _parse_int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DatasetError(
            f"{path.name} line {line}: column {column!r} is {value!r}, not an integer", path=str(path)
        ) from None


def _parse_label_categories(cell: str, path: Path, line: int) -> list[tuple[str, int]]:
    out = []
    for item in cell.split(";"):
        if not item.strip():
            continue
        m = _CATEGORY_ITEM.match(item)
        if not m:
            raise DatasetError(f"{path.name} line {line}: bad category entry {item!r}", path=str(path))
        out.append((m.group(1), int(m.group(2) or 0)))
    return out


def _safe_relative(name: str, path: Path, line: int) -> str:
    p = PurePosixPath(name.strip().replace("\\", "/"))
    if not name.strip() or p.is_absolute() or ".." in p.parts:
        raise DatasetError(
            f"{path.name} line {line}: file name {name!r} must be a relative path inside images/",
            path=str(path),
        )
    return str(p)


class BrodenDataset(ConceptDataset):
    """A Broden directory (see the module docstring for the layout and rules).

    Opening parses the CSV files, checks whole-image label numbers against
    label.csv and checks that every referenced image and mask file exists (one
    directory listing per folder, nothing is decoded). Decoding errors, mask
    shapes and mask label numbers are checked when a sample is read, or for
    every file by :meth:`validate` with ``full=True``.

    Args:
        root: the Broden directory.
        split: keep only rows whose ``split`` equals this (e.g. "train", "val").
        image_size: (H, W) every image is resized to (bilinear); default the
            ``ih, iw`` of the first kept row.
        max_images: keep at most this many rows (the first ones).

    Attributes:
        mask_size: (sh, sw) of the first kept row; masks of rows with another
            mask size are resized to it (nearest).
        splits: the split of every kept row.
        image_names: the image path (relative to images/) of every kept row.

    Raises:
        DatasetError: naming the offending file.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        image_size: tuple[int, int] | None = None,
        max_images: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"Broden directory {self.root} does not exist", path=str(self.root))
        self.name = self.root.name
        self.images_dir = self.root / "images"
        self._images_root = os.fspath(self.images_dir)

        label_rows = self._read_labels()
        numbers = [n for n, _, _ in label_rows]
        dense = {n: i + 1 for i, n in enumerate(sorted(numbers))}
        self.label_numbers = {dense[n]: n for n in numbers}
        self._lut = np.full(_MASK_LUT_SIZE, -1, np.int32)
        self._lut[0] = 0
        for n, d in dense.items():
            if n < _MASK_LUT_SIZE:
                self._lut[n] = d

        self._rows, columns, whole_image_category = self._read_index(dense, split, max_images)

        c_files = self._read_c_files(dense)
        by_number = {}
        for n, name, cats in label_rows:
            d = dense[n]
            if d in whole_image_category:
                category = whole_image_category[d]
            elif cats:
                best = max(f for _, f in cats)
                category = next(c for c, f in cats if f == best)
            elif d in c_files:
                category = c_files[d]
            else:
                category = "unknown"
            by_number[d] = Concept(d, name, category)
        self.concepts = [by_number[i] for i in range(1, len(by_number) + 1)]

        categories = self._read_category_order()
        for c in [*columns, *(c.category for c in self.concepts)]:
            if c not in categories:
                categories.append(c)
        self.categories = categories

        scene = [c for c in self.concepts if c.category == "scene"]
        self.classes = [c.name.removesuffix("-s") for c in scene]
        self._class_of = {c.number: i for i, c in enumerate(scene)}

        first = self._rows[0]
        assert self._first_image_size is not None  # set with the first row kept, and one was
        self.image_size = size_pair(image_size) if image_size else self._first_image_size
        self.mask_size = first.mask_size
        self.splits = [r.split for r in self._rows]
        self.image_names = [r.image for r in self._rows]
        self._check_files_exist()

    def _read_labels(self) -> list[tuple[int, str, list[tuple[str, int]]]]:
        path = self.root / "label.csv"
        header, rows = _read_csv(path, "label file")
        for col in ("number", "name"):
            if col not in header:
                raise DatasetError(f"{path} has no {col!r} column (header: {header})", path=str(path))
        i_num, i_name = header.index("number"), header.index("name")
        i_cat = header.index("category") if "category" in header else None
        out, seen = [], set()
        for line, r in enumerate(rows, start=2):
            if len(r) <= max(i_num, i_name):
                raise DatasetError(f"{path.name} line {line}: too few columns", path=str(path))
            n = _parse_int(r[i_num], path, line, "number")
            if n == 0:
                continue
            if n < 0:
                raise DatasetError(f"{path.name} line {line}: negative label number {n}", path=str(path))
            if n in seen:
                raise DatasetError(f"{path.name} line {line}: label number {n} appears twice", path=str(path))
            seen.add(n)
            cats = _parse_label_categories(r[i_cat], path, line) if i_cat is not None and i_cat < len(r) else []
            out.append((n, r[i_name].strip(), cats))
        if not out:
            raise DatasetError(f"{path} lists no labels", path=str(path))
        return out

    def _read_index(
        self, dense: dict[int, int], split: str | None, max_images: int | None
    ) -> tuple[list[_Row], list[str], dict[int, str]]:
        path = self.root / "index.csv"
        header, rows = _read_csv(path, "index file")
        if tuple(header[:6]) != INDEX_COLUMNS:
            raise DatasetError(
                f"{path} must start with the columns {','.join(INDEX_COLUMNS)}, found {','.join(header[:6])}",
                path=str(path),
            )
        columns = header[6:]
        kept: list[_Row] = []
        whole_image_category: dict[int, str] = {}
        self._first_image_size: tuple[int, int] | None = None
        for line, r in enumerate(rows, start=2):
            if len(r) < 6:
                raise DatasetError(f"{path.name} line {line}: too few columns", path=str(path))
            keep = (split is None or r[1].strip() == split) and (max_images is None or len(kept) < max_images)
            masks, whole = [], []
            for col, cell in zip(columns, r[6:], strict=False):
                for item in cell.split(";"):
                    item = item.strip()
                    if not item:
                        continue
                    if item.isdigit():
                        n = int(item)
                        if n not in dense:
                            raise DatasetError(
                                f"{path.name} line {line}: label {n} in column {col!r} is not in label.csv",
                                path=str(path),
                            )
                        whole_image_category.setdefault(dense[n], col)
                        whole.append(dense[n])
                    elif keep:
                        masks.append(_safe_relative(item, path, line))
            if not keep:
                continue
            ih, iw, sh, sw = (_parse_int(r[k], path, line, INDEX_COLUMNS[k]) for k in range(2, 6))
            if min(ih, iw, sh, sw) <= 0:
                raise DatasetError(f"{path.name} line {line}: sizes must be positive", path=str(path))
            if self._first_image_size is None:
                self._first_image_size = (ih, iw)
            kept.append(
                _Row(
                    image=_safe_relative(r[0], path, line),
                    split=r[1].strip(),
                    mask_size=(sh, sw),
                    masks=tuple(masks),
                    image_labels=tuple(whole),
                )
            )
        if not kept:
            where = f" with split {split!r}" if split is not None else ""
            raise DatasetError(f"{path} lists no images{where}", path=str(path))
        return kept, columns, whole_image_category

    def _read_c_files(self, dense: dict[int, int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for path in sorted(self.root.glob("c_*.csv")):
            header, rows = _read_csv(path, "category label file")
            if "number" not in header:
                continue
            i = header.index("number")
            for line, r in enumerate(rows, start=2):
                if i < len(r):
                    n = _parse_int(r[i], path, line, "number")
                    if n in dense:
                        out.setdefault(dense[n], path.stem[2:])
        return out

    def _read_category_order(self) -> list[str]:
        path = self.root / "category.csv"
        if not path.is_file():
            return []
        header, rows = _read_csv(path, "category file")
        if "name" not in header:
            raise DatasetError(f"{path} has no 'name' column", path=str(path))
        i = header.index("name")
        return [r[i].strip() for r in rows if i < len(r) and r[i].strip()]

    def _referenced_files(self) -> Iterable[str]:
        for row in self._rows:
            yield row.image
            yield from row.masks

    def _check_files_exist(self) -> None:
        listings: dict[str, set[str] | None] = {}
        for rel in self._referenced_files():
            parent, _, base = rel.rpartition("/")
            if parent not in listings:
                try:
                    listings[parent] = {e.name for e in os.scandir(self.images_dir / parent)}
                except OSError:
                    listings[parent] = None
            names = listings[parent]
            if names is None or base not in names:
                path = self.images_dir / rel
                raise DatasetError(f"file {path} listed in index.csv does not exist", path=str(path))

    def __len__(self) -> int:
        return len(self._rows)

    def _read_mask(self, rel: str, expected: tuple[int, int]) -> np.ndarray:
        path = os.path.join(self._images_root, rel)
        raw = read_label_png(path)
        if raw.shape != tuple(expected):
            raise DatasetError(
                f"mask {path} is {raw.shape[0]}x{raw.shape[1]}, index.csv says {expected[0]}x{expected[1]}",
                path=str(path),
            )
        return mask_concepts(raw, self._lut, path, "label.csv", self.mask_size)

    def __getitem__(self, index: int) -> Sample:
        row = self._rows[self._checked_index(index)]
        image = read_rgb(self.images_dir / row.image, size=self.image_size)
        maps = [self._read_mask(m, row.mask_size) for m in row.masks]
        label_maps = np.stack(maps).astype(np.int32) if maps else np.zeros((0, *self.mask_size), np.int32)
        image_labels = np.asarray(row.image_labels, dtype=np.int32)
        class_label = next((self._class_of[n] for n in row.image_labels if n in self._class_of), -1)
        return Sample(image=image, label_maps=label_maps, image_labels=image_labels, class_label=class_label)

    def validate(self, full: bool = False) -> int:
        """Check every referenced file.

        Args:
            full: also decode every image and mask, checking mask shapes and
                label numbers (slow: reads the whole dataset).

        Returns:
            The number of files checked.

        Raises:
            DatasetError: naming the first bad file.
        """
        count = 0
        for row in self._rows:
            for rel in (row.image, *row.masks):
                path = self.images_dir / rel
                if not path.is_file():
                    raise DatasetError(f"file {path} listed in index.csv does not exist", path=str(path))
                count += 1
            if full:
                read_rgb(self.images_dir / row.image)
                for m in row.masks:
                    self._read_mask(m, row.mask_size)
        return count


def _concept_table(concepts: Sequence[Concept]) -> None:
    for i, c in enumerate(concepts):
        if c.number != i + 1:
            raise ValueError(f"concepts must be numbered densely from 1; concept {c.name!r} has number {c.number}")


def write_broden(
    root: str | os.PathLike[str],
    samples: Iterable[tuple[str, Sample]],
    concepts: Sequence[Concept],
    categories: Sequence[str],
    image_size: tuple[int, int],
    mask_size: tuple[int, int],
    classes: Sequence[str] | None = None,
) -> Path:
    """Write samples as a Broden directory that :class:`BrodenDataset` reads back exactly.

    Images are written as PNG (lossless) at ``images/NNNNNN.png``. Each label
    map is split by the category of its concepts; the piece of each category
    becomes one mask PNG ``images/NNNNNN_<cat>.png`` (``_<cat>_<j>.png`` for the
    j-th further map of that category) listed in that category's column, and
    all-zero maps are not written (Broden leaves such cells empty). Whole-image
    labels go to the column of their category. With ``classes``, every scene
    class gets a concept of category ``scene`` (named ``<class>-s`` unless a
    scene concept named ``<class>`` or ``<class>-s`` exists; new ones are
    numbered after the last concept) and the sample's ``class_label`` is written
    to the ``scene`` column.

    Reading back gives identical images, label maps and image labels when every
    map holds one category's concepts, no map is all zero, the maps come in
    ``categories`` order, and image labels are in category order.

    The directory is built next to ``root`` and renamed into place at the end,
    so a failure leaves nothing behind.

    Args:
        root: output directory; must not exist or be empty.
        samples: (split, sample) pairs; images uint8 [H, W, 3] with (H, W) =
            ``image_size``, label maps int [K, sh, sw] with (sh, sw) =
            ``mask_size``.
        concepts: the concepts, numbered densely 1..C.
        categories: category names, in column order (must be ``[A-Za-z0-9_-]+``).
        image_size: (H, W).
        mask_size: (sh, sw).
        classes: scene class names indexed by ``Sample.class_label``.

    Returns:
        The path of the written directory.

    Raises:
        DatasetError: ``root`` exists and is not empty.
        ValueError: a sample does not match the sizes, or a label is unknown.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"output directory {root} already exists and is not empty", path=str(root))
    concepts = list(concepts)
    _concept_table(concepts)
    categories = list(categories)
    class_numbers: list[int] = []
    if classes is not None:
        if "scene" not in categories:
            categories.append("scene")
        scene_by_name = {c.name: c.number for c in concepts if c.category == "scene"}
        for cls in classes:
            number = scene_by_name.get(cls) or scene_by_name.get(f"{cls}-s")
            if number is None:
                number = len(concepts) + 1
                concepts.append(Concept(number, f"{cls}-s", "scene"))
            class_numbers.append(number)
    for cat in {c.category for c in concepts}:
        if cat not in categories:
            categories.append(cat)
    for cat in categories:
        if not _SAFE_CATEGORY.match(cat):
            raise ValueError(f"category name {cat!r} must match [A-Za-z0-9_-]+")
    col = {c: i for i, c in enumerate(categories)}
    cat_of = np.array([-1] + [col[c.category] for c in concepts], dtype=np.int64)
    n_concepts = len(concepts)
    frequency = np.zeros(n_concepts + 1, np.int64)
    coverage = np.zeros(n_concepts + 1, np.float64)
    cat_frequency = np.zeros(len(categories), np.int64)
    sh, sw = mask_size

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        index_rows = []
        for i, (split, sample) in enumerate(samples):
            stem = f"{i:06d}"
            image = np.asarray(sample.image)
            if image.shape != (image_size[0], image_size[1], 3) or image.dtype != np.uint8:
                raise ValueError(f"sample {i}: image must be uint8 {image_size[0]}x{image_size[1]}x3")
            Image.fromarray(image, "RGB").save(tmp / "images" / f"{stem}.png", compress_level=1)
            cells: list[list[str]] = [[] for _ in categories]
            present = np.zeros(n_concepts + 1, bool)
            maps = np.asarray(sample.label_maps)
            if maps.size and maps.shape[1:] != (sh, sw):
                raise ValueError(f"sample {i}: label maps must be {sh}x{sw}")
            for label_map in maps.reshape(-1, sh, sw) if maps.size else []:
                if label_map.min() < 0 or label_map.max() > n_concepts:
                    raise ValueError(f"sample {i}: label map holds numbers outside 0..{n_concepts}")
                counts = np.bincount(label_map.ravel(), minlength=n_concepts + 1)
                counts[0] = 0
                present |= counts > 0
                coverage += counts / float(sh * sw)
                map_cats = cat_of[label_map]
                for k in sorted(set(cat_of[np.nonzero(counts)[0]].tolist())):
                    piece = np.where(map_cats == k, label_map, 0)
                    j = len(cells[k])
                    name = f"{stem}_{categories[k]}.png" if j == 0 else f"{stem}_{categories[k]}_{j}.png"
                    write_label_png(tmp / "images" / name, piece)
                    cells[k].append(name)
            whole = [int(n) for n in np.asarray(sample.image_labels).ravel()]
            if classes is not None and sample.class_label >= 0:
                number = class_numbers[sample.class_label]
                if number not in whole:
                    whole.append(number)
            for n in whole:
                if not 1 <= n <= n_concepts:
                    raise ValueError(f"sample {i}: image label {n} is not a concept number")
                if str(n) not in cells[cat_of[n]]:
                    cells[cat_of[n]].append(str(n))
                    present[n] = True
                    coverage[n] += 1.0
            frequency += present
            for k in set(cat_of[np.nonzero(present)[0]].tolist()):
                cat_frequency[k] += 1
            index_rows.append(
                [f"{stem}.png", split, image_size[0], image_size[1], sh, sw, *(";".join(c) for c in cells)]
            )

        with open(tmp / "index.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*INDEX_COLUMNS, *categories])
            w.writerows(index_rows)
        with open(tmp / "label.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
            for c in concepts:
                w.writerow(
                    [
                        c.number,
                        c.name,
                        f"{c.category}({frequency[c.number]})",
                        frequency[c.number],
                        _fmt(coverage[c.number]),
                        "",
                    ]
                )
        with open(tmp / "category.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name", "first", "last", "count", "frequency"])
            for k, cat in enumerate(categories):
                numbers = [c.number for c in concepts if c.category == cat]
                w.writerow([cat, min(numbers, default=0), max(numbers, default=0), len(numbers), cat_frequency[k]])
        for cat in categories:
            with open(tmp / f"c_{cat}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["code", "number", "name", "frequency", "coverage"])
                members = [c for c in concepts if c.category == cat]
                for code, c in enumerate(members, start=1):
                    w.writerow([code, c.number, c.name, frequency[c.number], _fmt(coverage[c.number])])
        if root.exists():
            root.rmdir()
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _fmt(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else "0"

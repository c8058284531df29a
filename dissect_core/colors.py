"""Colour-name concepts computed from pixels.

Each pixel, at mask resolution, gets one of the 11 basic colour names of
Berlin and Kay (the names van de Weijer et al., 2009, learned from real images
and that Broden uses, with a ``-c`` suffix): black, blue, brown, grey, green,
orange, pink, purple, red, white, yellow.

The assignment is a fixed nearest-prototype rule: the image is first reduced to
the mask size by area averaging, each averaged pixel is converted from sRGB to
CIELab (D65 white point), and it gets the name of the nearest prototype in
:data:`COLOR_PROTOTYPES` by Euclidean distance in Lab (CIE76 delta E). The
prototypes are focal colours of the basic colour terms plus, for some names, a
lighter or darker variant, written in sRGB:

======  =================================================
name    sRGB prototypes
======  =================================================
black   (0, 0, 0)
blue    (30, 80, 200), (100, 160, 230), (80, 190, 220)
brown   (120, 70, 30), (165, 120, 80)
grey    (128, 128, 128), (185, 185, 185)
green   (40, 160, 60), (20, 90, 30), (150, 200, 80)
orange  (245, 130, 30)
pink    (245, 160, 190), (230, 90, 160)
purple  (120, 50, 150), (180, 120, 210)
red     (200, 30, 30), (130, 20, 20)
white   (255, 255, 255)
yellow  (250, 225, 40), (240, 230, 140)
======  =================================================

Every pixel gets exactly one colour, so colour concepts live on one label map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .concepts import Concept, ConceptDataset, Sample, size_pair

__all__ = [
    "COLOR_CATEGORY",
    "COLOR_CONCEPT_NAMES",
    "COLOR_NAMES",
    "COLOR_PROTOTYPES",
    "WithColorConcepts",
    "area_downsample",
    "color_index_map",
    "has_color_concepts",
    "rgb_to_lab",
]

COLOR_CATEGORY = "color"

COLOR_NAMES: tuple[str, ...] = (
    "black",
    "blue",
    "brown",
    "grey",
    "green",
    "orange",
    "pink",
    "purple",
    "red",
    "white",
    "yellow",
)

COLOR_CONCEPT_NAMES: tuple[str, ...] = tuple(f"{n}-c" for n in COLOR_NAMES)

COLOR_PROTOTYPES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (0, 0, 0)),
    ("blue", (30, 80, 200)),
    ("blue", (100, 160, 230)),
    ("blue", (80, 190, 220)),
    ("brown", (120, 70, 30)),
    ("brown", (165, 120, 80)),
    ("grey", (128, 128, 128)),
    ("grey", (185, 185, 185)),
    ("green", (40, 160, 60)),
    ("green", (20, 90, 30)),
    ("green", (150, 200, 80)),
    ("orange", (245, 130, 30)),
    ("pink", (245, 160, 190)),
    ("pink", (230, 90, 160)),
    ("purple", (120, 50, 150)),
    ("purple", (180, 120, 210)),
    ("red", (200, 30, 30)),
    ("red", (130, 20, 20)),
    ("white", (255, 255, 255)),
    ("yellow", (250, 225, 40)),
    ("yellow", (240, 230, 140)),
)

_ALIASES = {"gray-c": "grey-c"}

_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert sRGB values to CIELab (D65).

    Args:
        rgb: array [..., 3] of sRGB values in 0..255 (any real dtype or uint8).

    Returns:
        float64 array [..., 3] of (L, a, b).
    """
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = (linear @ _SRGB_TO_XYZ.T) / _D65_WHITE
    eps = (6.0 / 29.0) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3.0 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


_PROTOTYPES_LAB = rgb_to_lab(np.array([rgb for _, rgb in COLOR_PROTOTYPES], dtype=np.float64))
_PROTOTYPE_INDEX = np.array([COLOR_NAMES.index(name) + 1 for name, _ in COLOR_PROTOTYPES], dtype=np.int32)


def area_downsample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reduce an RGB image to ``size`` by area averaging.

    Args:
        image: uint8 array [H, W, 3].
        size: target (h, w), each at most the source size.

    Returns:
        float64 array [h, w, 3] of mean sRGB values (not rounded).
    """
    h, w = size
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (h, w):
        return image.astype(np.float64)
    if src_h % h == 0 and src_w % w == 0:
        fh, fw = src_h // h, src_w // w
        return image.reshape(h, fh, w, fw, 3).astype(np.float64).mean(axis=(1, 3))
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double()
    return F.interpolate(t, size=(h, w), mode="area")[0].permute(1, 2, 0).numpy()


def color_index_map(image: np.ndarray, mask_size: tuple[int, int]) -> np.ndarray:
    """Name the colour of every mask pixel.

    Args:
        image: uint8 array [H, W, 3], RGB.
        mask_size: (sh, sw), the resolution of the result.

    Returns:
        int32 array [sh, sw] of colour indices 1..11 (1 + index into
        :data:`COLOR_NAMES`); every pixel gets a colour.
    """
    small = area_downsample(image, mask_size)
    lab = rgb_to_lab(small)
    d = ((lab[..., None, :] - _PROTOTYPES_LAB) ** 2).sum(axis=-1)
    return _PROTOTYPE_INDEX[d.argmin(axis=-1)]


def has_color_concepts(concepts: list[Concept]) -> bool:
    """Whether a concept list already holds colour-name concepts.

    Args:
        concepts: the dataset's concepts.

    Returns:
        True when any concept is in category ``"color"`` or is named like a
        colour concept (``red-c``, also ``gray-c``).
    """
    names = set(COLOR_CONCEPT_NAMES)
    return any(c.category == COLOR_CATEGORY or _ALIASES.get(c.name, c.name) in names for c in concepts)


class WithColorConcepts(ConceptDataset):
    """A dataset with the 11 colour-name concepts added.

    The colour concepts (category ``"color"``) are numbered after the wrapped
    dataset's last concept, in :data:`COLOR_NAMES` order, and each sample gets
    one more label map (the last) holding them. When the wrapped dataset already
    has colour concepts (see :func:`has_color_concepts`) nothing is added and
    samples pass through unchanged (``self.added`` is False).

    Args:
        dataset: the dataset to extend.
    """

    def __init__(self, dataset: ConceptDataset) -> None:
        self.dataset = dataset
        self.name = dataset.name
        self.image_size = size_pair(dataset.image_size)
        self.mask_size = size_pair(dataset.mask_size)
        self.classes = list(getattr(dataset, "classes", []))
        self.added = not has_color_concepts(list(dataset.concepts))
        self.concepts = list(dataset.concepts)
        self.categories = list(dataset.categories)
        if self.added:
            first = len(self.concepts) + 1
            self.concepts += [Concept(first + i, name, COLOR_CATEGORY) for i, name in enumerate(COLOR_CONCEPT_NAMES)]
            if COLOR_CATEGORY not in self.categories:
                self.categories.append(COLOR_CATEGORY)
        self._offset = len(dataset.concepts)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[index]
        if not self.added:
            return sample
        colors = color_index_map(sample.image, self.mask_size) + self._offset
        maps = np.asarray(sample.label_maps, dtype=np.int32)
        if maps.ndim != 3 or maps.shape[0] == 0:
            maps = np.zeros((0, *self.mask_size), np.int32)
        return Sample(
            image=sample.image,
            label_maps=np.concatenate([maps, colors[None].astype(np.int32)], axis=0),
            image_labels=sample.image_labels,
            class_label=sample.class_label,
            latent=sample.latent,
        )

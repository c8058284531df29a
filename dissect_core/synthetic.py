"""Synthetic outdoor scenes with exact object, part, material and colour masks.

Every image is a function of ``(seed, index, image_size)`` alone (its own
``numpy.random.default_rng([seed, index])``), so :class:`SyntheticScenes`
renders on the fly exactly the pixels that :func:`generate` writes as a Broden
directory.

A scene: a sky above a random horizon and a ground (grass, road, water or
sand, sometimes with a second band at the bottom); objects standing on the
ground (house, tree, car, person, boat) or in the sky (sun, cloud), larger
when nearer the bottom, drawn back to front. Colours are drawn from per-part
palettes with jitter; surfaces carry material textures (striped brick,
diagonal roof tile, grained wood, dotted fabric, noisy foliage, rippled water,
...).

Concepts (numbered in this order):

- object: sky, grass, road, water, sand, house, tree, car, person, boat, sun, cloud
- part: wall, roof, door, window (houses and cars), trunk, crown, body, wheel,
  head, torso, leg, hull, sail
- material: brick, plaster, tile, glass, wood, metal, rubber, foliage (tree
  crowns and grass), fabric, skin, waves, asphalt, grit
- color: the 11 colour names of :mod:`dissect_core.colors`, computed from the
  rendered pixels
- scene: one whole-image concept ``<class>-s`` per scene class

Scene classes are defined by which objects co-occur (each needs both of its
key objects; 10% of images lose one of them, and any other object type shows up
as a distractor with probability 0.12, clouds in half the images)::

    street       house + car       (mostly road)
    park         tree + person     (mostly grass)
    harbor       boat + house      (mostly water)
    countryside  house + tree      (mostly grass)
    beach        person + sun      (mostly sand)
    avenue       car + tree        (mostly road)

Every object type but the sun serves two classes, so a classifier has to
recognise objects and combine them.

Masks are rendered at image resolution and reduced by nearest sampling
(:func:`dissect_core.broden.resize_nearest`) to half the image size, as in
Broden, so masks and pixels agree. Label maps per sample: object, part,
material, colour (an all-zero part map is left out, as Broden leaves the cell
empty). The default image size is 64x64 (masks 32x32): a small CNN trains on
a couple of thousand of these in about a minute on two CPU cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .broden import resize_nearest, write_broden
from .colors import COLOR_CATEGORY, COLOR_CONCEPT_NAMES, color_index_map
from .concepts import Concept, ConceptDataset, Sample

__all__ = [
    "CATEGORIES",
    "DEFAULT_IMAGE_SIZE",
    "MATERIAL_NAMES",
    "OBJECT_NAMES",
    "PART_NAMES",
    "SCENE_CLASSES",
    "Scene",
    "SyntheticScenes",
    "generate",
    "render_scene",
    "synthetic_concepts",
]

OBJECT_NAMES: tuple[str, ...] = (
    "sky",
    "grass",
    "road",
    "water",
    "sand",
    "house",
    "tree",
    "car",
    "person",
    "boat",
    "sun",
    "cloud",
)
PART_NAMES: tuple[str, ...] = (
    "wall",
    "roof",
    "door",
    "window",
    "trunk",
    "crown",
    "body",
    "wheel",
    "head",
    "torso",
    "leg",
    "hull",
    "sail",
)
MATERIAL_NAMES: tuple[str, ...] = (
    "brick",
    "plaster",
    "tile",
    "glass",
    "wood",
    "metal",
    "rubber",
    "foliage",
    "fabric",
    "skin",
    "waves",
    "asphalt",
    "grit",
)
SCENE_CLASSES: tuple[str, ...] = ("street", "park", "harbor", "countryside", "beach", "avenue")
CATEGORIES: tuple[str, ...] = ("object", "part", "material", COLOR_CATEGORY, "scene")
DEFAULT_IMAGE_SIZE: tuple[int, int] = (64, 64)

_GROUNDS = ("grass", "road", "water", "sand")
_GROUND_MATERIAL = {"grass": "foliage", "road": "asphalt", "water": "waves", "sand": "grit"}
_RECIPES: dict[str, tuple[tuple[str, str], dict[str, float]]] = {
    "street": (("house", "car"), {"road": 0.7, "grass": 0.1, "sand": 0.1, "water": 0.1}),
    "park": (("tree", "person"), {"grass": 0.7, "road": 0.1, "sand": 0.1, "water": 0.1}),
    "harbor": (("boat", "house"), {"water": 0.7, "grass": 0.1, "road": 0.1, "sand": 0.1}),
    "countryside": (("house", "tree"), {"grass": 0.7, "road": 0.1, "sand": 0.1, "water": 0.1}),
    "beach": (("person", "sun"), {"sand": 0.7, "water": 0.1, "grass": 0.1, "road": 0.1}),
    "avenue": (("car", "tree"), {"road": 0.7, "grass": 0.1, "sand": 0.1, "water": 0.1}),
}
_THINGS = ("house", "tree", "car", "person", "boat", "sun")
_DISTRACTOR_P = 0.12
_DROP_KEY_P = 0.1
_CLOUD_P = 0.5

_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "sky": ((110, 170, 230), (150, 195, 240), (170, 180, 195), (240, 180, 130)),
    "grass": ((60, 150, 60), (90, 170, 60), (50, 120, 50), (150, 170, 70)),
    "road": ((90, 90, 95), (60, 60, 65), (120, 115, 110)),
    "water": ((40, 100, 180), (50, 130, 170), (30, 70, 130), (80, 150, 190)),
    "sand": ((220, 200, 140), (200, 180, 120), (235, 215, 170)),
    "wall": ((200, 60, 50), (230, 220, 190), (240, 240, 240), (220, 200, 90), (150, 150, 160), (210, 150, 170)),
    "roof": ((150, 40, 30), (90, 60, 40), (70, 70, 80), (40, 40, 45), (190, 90, 40)),
    "door": ((110, 70, 40), (60, 40, 30), (40, 80, 140), (150, 30, 30)),
    "window": ((170, 210, 235), (120, 160, 200), (220, 230, 240)),
    "trunk": ((110, 75, 40), (90, 60, 35), (130, 100, 70)),
    "crown": ((40, 130, 40), (70, 160, 50), (30, 90, 35), (200, 120, 30), (180, 160, 40)),
    "body": (
        (200, 30, 30),
        (30, 70, 180),
        (230, 200, 40),
        (240, 240, 240),
        (40, 40, 45),
        (40, 140, 60),
        (150, 150, 155),
        (230, 120, 30),
    ),
    "wheel": ((30, 30, 30), (50, 50, 55)),
    "torso": (
        (200, 40, 40),
        (40, 80, 190),
        (40, 150, 60),
        (230, 200, 50),
        (150, 60, 160),
        (240, 240, 240),
        (40, 40, 40),
        (240, 130, 40),
    ),
    "leg": ((40, 50, 110), (60, 60, 60), (120, 90, 60), (30, 30, 30)),
    "head": ((240, 200, 170), (200, 150, 110), (140, 100, 70), (90, 60, 40)),
    "hull": ((240, 240, 240), (40, 60, 140), (170, 40, 40), (120, 80, 45)),
    "sail": ((245, 245, 240), (230, 210, 80), (200, 50, 50), (240, 150, 60)),
    "sun": ((255, 220, 60), (255, 170, 50), (255, 250, 200)),
    "cloud": ((245, 245, 250), (210, 215, 225), (180, 180, 190)),
}

_OBJ = {n: i + 1 for i, n in enumerate(OBJECT_NAMES)}
_PART = {n: i + 1 for i, n in enumerate(PART_NAMES)}
_MAT = {n: i + 1 for i, n in enumerate(MATERIAL_NAMES)}


def synthetic_concepts() -> list[Concept]:
    """The concept list of the synthetic scenes.

    Returns:
        Concepts numbered 1..C: objects, parts, materials, colours, scenes
        (see the module docstring).
    """
    names = [
        *((n, "object") for n in OBJECT_NAMES),
        *((n, "part") for n in PART_NAMES),
        *((n, "material") for n in MATERIAL_NAMES),
        *((n, COLOR_CATEGORY) for n in COLOR_CONCEPT_NAMES),
        *((f"{n}-s", "scene") for n in SCENE_CLASSES),
    ]
    return [Concept(i + 1, name, cat) for i, (name, cat) in enumerate(names)]


_PART_OFFSET = len(OBJECT_NAMES)
_MAT_OFFSET = _PART_OFFSET + len(PART_NAMES)
_COLOR_OFFSET = _MAT_OFFSET + len(MATERIAL_NAMES)
_SCENE_OFFSET = _COLOR_OFFSET + len(COLOR_CONCEPT_NAMES)


@dataclass
class Scene:
    """One rendered scene at image resolution.

    Attributes:
        image: uint8 array [H, W, 3].
        objects: int32 array [H, W], 1-based index into OBJECT_NAMES (never 0).
        parts: int32 array [H, W], 1-based index into PART_NAMES, 0 = none.
        materials: int32 array [H, W], 1-based index into MATERIAL_NAMES, 0 = none.
        class_label: index into SCENE_CLASSES.
        split: "train" or "val".
    """

    image: np.ndarray
    objects: np.ndarray
    parts: np.ndarray
    materials: np.ndarray
    class_label: int
    split: str


class _Canvas:
    def __init__(self, rng: np.random.Generator, size: tuple[int, int]) -> None:
        h, w = size
        self.rng = rng
        self.h, self.w = h, w
        self.yy, self.xx = np.mgrid[0:h, 0:w]
        self.u = (self.xx + 0.5) / w
        self.v = (self.yy + 0.5) / h
        self.noise = rng.random((h, w)) * 2.0 - 1.0
        self.image = np.zeros((h, w, 3), np.float64)
        self.objects = np.zeros((h, w), np.int32)
        self.parts = np.zeros((h, w), np.int32)
        self.materials = np.zeros((h, w), np.int32)

    def color(self, palette: str) -> np.ndarray:
        options = _PALETTES[palette]
        base = np.asarray(options[self.rng.integers(len(options))], np.float64)
        return base + self.rng.uniform(-18, 18, 3)

    def paint(self, mask: np.ndarray, obj: str, part: str | None, material: str | None, color: np.ndarray) -> None:
        if not mask.any():
            return
        ys, xs = np.nonzero(mask)
        self.objects[ys, xs] = _OBJ[obj]
        self.parts[ys, xs] = _PART[part] if part else 0
        self.materials[ys, xs] = _MAT[material] if material else 0
        self.image[ys, xs] = _texture(material, color, ys, xs, self.noise[ys, xs], self.v[ys, xs])

    def rect(self, u0: float, v0: float, u1: float, v1: float) -> np.ndarray:
        return (self.u >= u0) & (self.u < u1) & (self.v >= v0) & (self.v < v1)

    def ellipse(self, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        return ((self.u - cu) / ru) ** 2 + ((self.v - cv) / rv) ** 2 <= 1.0

    def triangle(self, p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float]) -> np.ndarray:
        def side(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
            return (b[0] - a[0]) * (self.v - a[1]) - (b[1] - a[1]) * (self.u - a[0])

        s0, s1, s2 = side(p0, p1), side(p1, p2), side(p2, p0)
        return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))


def _texture(
    material: str | None, color: np.ndarray, ys: np.ndarray, xs: np.ndarray, noise: np.ndarray, v: np.ndarray
) -> np.ndarray:
    c = np.broadcast_to(color, (len(ys), 3)).copy()
    n = noise[:, None]
    if material is None:
        c += 25.0 * (v[:, None] - 0.3)
    elif material == "brick":
        course = ys // 3
        mortar = (ys % 3 == 0) | ((xs + 3 * (course % 2)) % 6 == 0)
        c[mortar] = 0.5 * c[mortar] + 100.0
    elif material == "plaster":
        c += 8.0 * n
    elif material == "tile":
        c[(xs + ys) % 4 < 2] *= 0.75
    elif material == "glass":
        c[(xs - ys) % 5 == 0] += 45.0
    elif material == "wood":
        c *= np.where(xs % 3 == 0, 0.8, 1.0)[:, None]
        c += 10.0 * n
    elif material == "metal":
        c[ys % 5 == 0] += 40.0
    elif material == "rubber":
        c += 10.0 * n
    elif material == "foliage":
        c *= 0.8 + 0.3 * n
    elif material == "fabric":
        c[(xs % 3 == 0) & (ys % 3 == 0)] *= 0.55
    elif material == "skin":
        pass
    elif material == "waves":
        c[(ys + (xs // 4) % 2) % 3 == 0] += 45.0
    elif material == "asphalt":
        c += 25.0 * n
    elif material == "grit":
        c += 15.0 * n
        c[(xs * 7 + ys * 3) % 5 == 0] -= 35.0
    return c


def _draw_house(cv: _Canvas, u: float, vb: float, s: float) -> None:
    rng = cv.rng
    w, h = 0.30 * s, 0.22 * s
    wall_mat = "brick" if rng.random() < 0.5 else "plaster"
    cv.paint(cv.rect(u - w / 2, vb - h, u + w / 2, vb), "house", "wall", wall_mat, cv.color("wall"))
    over = 0.03 * s
    roof = cv.triangle((u - w / 2 - over, vb - h), (u + w / 2 + over, vb - h), (u, vb - h - 0.14 * s))
    cv.paint(roof, "house", "roof", "tile", cv.color("roof"))
    du = rng.uniform(-0.25, 0.25) * w
    dw, dh = 0.07 * s, 0.11 * s
    cv.paint(cv.rect(u + du - dw / 2, vb - dh, u + du + dw / 2, vb), "house", "door", "wood", cv.color("door"))
    ws = 0.06 * s
    wv = vb - 0.65 * h
    glass = cv.color("window")
    for side in (-1, 1):
        wu = u + du + side * 0.09 * s
        if abs(wu - u) + ws / 2 < w / 2 - 0.01 * s:
            cv.paint(cv.rect(wu - ws / 2, wv - ws / 2, wu + ws / 2, wv + ws / 2), "house", "window", "glass", glass)


def _draw_tree(cv: _Canvas, u: float, vb: float, s: float) -> None:
    th = 0.14 * s
    cv.paint(cv.rect(u - 0.025 * s, vb - th, u + 0.025 * s, vb), "tree", "trunk", "wood", cv.color("trunk"))
    if cv.rng.random() < 0.3:
        crown = cv.triangle(
            (u - 0.11 * s, vb - th + 0.02 * s), (u + 0.11 * s, vb - th + 0.02 * s), (u, vb - th - 0.30 * s)
        )
    else:
        crown = cv.ellipse(u, vb - th - 0.10 * s, 0.11 * s, 0.13 * s)
    cv.paint(crown, "tree", "crown", "foliage", cv.color("crown"))


def _draw_car(cv: _Canvas, u: float, vb: float, s: float) -> None:
    body_color = cv.color("body")
    cabin = cv.rect(u - 0.09 * s, vb - 0.15 * s, u + 0.08 * s, vb - 0.085 * s)
    lower = cv.rect(u - 0.16 * s, vb - 0.09 * s, u + 0.16 * s, vb - 0.03 * s)
    cv.paint(cabin | lower, "car", "body", "metal", body_color)
    window = cv.rect(u - 0.075 * s, vb - 0.14 * s, u + 0.065 * s, vb - 0.09 * s)
    cv.paint(window, "car", "window", "glass", cv.color("window"))
    wheel_color = cv.color("wheel")
    for side in (-1, 1):
        cv.paint(
            cv.ellipse(u + side * 0.10 * s, vb - 0.035 * s, 0.035 * s, 0.035 * s), "car", "wheel", "rubber", wheel_color
        )


def _draw_person(cv: _Canvas, u: float, vb: float, s: float) -> None:
    leg_color = cv.color("leg")
    for side in (-1, 1):
        lu = u + side * 0.016 * s
        cv.paint(cv.rect(lu - 0.012 * s, vb - 0.11 * s, lu + 0.012 * s, vb), "person", "leg", "fabric", leg_color)
    cv.paint(
        cv.rect(u - 0.035 * s, vb - 0.20 * s, u + 0.035 * s, vb - 0.10 * s),
        "person",
        "torso",
        "fabric",
        cv.color("torso"),
    )
    cv.paint(cv.ellipse(u, vb - 0.235 * s, 0.03 * s, 0.035 * s), "person", "head", "skin", cv.color("head"))


def _draw_boat(cv: _Canvas, u: float, vb: float, s: float) -> None:
    top, bottom = vb - 0.07 * s, vb
    hull = (cv.v >= top) & (cv.v < bottom)
    frac = np.clip((cv.v - top) / (bottom - top), 0.0, 1.0)
    half = 0.17 * s - 0.05 * s * frac
    hull &= np.abs(cv.u - u) <= half
    material = "wood" if cv.rng.random() < 0.5 else "metal"
    cv.paint(hull, "boat", "hull", material, cv.color("hull"))
    sail = cv.triangle((u - 0.005 * s, top - 0.01 * s), (u - 0.005 * s, top - 0.26 * s), (u + 0.13 * s, top - 0.01 * s))
    cv.paint(sail, "boat", "sail", "fabric", cv.color("sail"))


def _draw_sun(cv: _Canvas, u: float, v: float, s: float) -> None:
    cv.paint(cv.ellipse(u, v, 0.07 * s, 0.07 * s), "sun", None, None, cv.color("sun"))


def _draw_cloud(cv: _Canvas, u: float, v: float, s: float) -> None:
    mask = (
        cv.ellipse(u, v, 0.10 * s, 0.04 * s)
        | cv.ellipse(u - 0.06 * s, v + 0.01 * s, 0.06 * s, 0.035 * s)
        | cv.ellipse(u + 0.05 * s, v - 0.02 * s, 0.06 * s, 0.04 * s)
    )
    cv.paint(mask, "cloud", None, None, cv.color("cloud"))


_DRAW: dict[str, Callable[[_Canvas, float, float, float], None]] = {
    "house": _draw_house,
    "tree": _draw_tree,
    "car": _draw_car,
    "person": _draw_person,
    "boat": _draw_boat,
    "sun": _draw_sun,
    "cloud": _draw_cloud,
}


def render_scene(
    seed: int, index: int, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, split_fraction: float = 0.2
) -> Scene:
    """Render scene ``index`` of the scene family ``seed``.

    Args:
        seed: family seed.
        index: image index (any non-negative int; scenes are independent).
        image_size: (H, W).
        split_fraction: probability that the scene is in the "val" split.

    Returns:
        The :class:`Scene`, a pure function of the arguments.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    split = "val" if rng.random() < split_fraction else "train"
    class_label = int(rng.integers(len(SCENE_CLASSES)))
    keys, grounds = _RECIPES[SCENE_CLASSES[class_label]]
    cv = _Canvas(rng, image_size)

    horizon = rng.uniform(0.36, 0.55)
    ground = str(rng.choice(list(grounds), p=list(grounds.values())))
    cv.paint(cv.v < horizon, "sky", None, None, cv.color("sky"))
    cv.paint(cv.v >= horizon, ground, None, _GROUND_MATERIAL[ground], cv.color(ground))
    if rng.random() < 0.3:
        other = str(rng.choice([g for g in _GROUNDS if g != ground]))
        band = rng.uniform(0.85, 0.93)
        cv.paint(cv.v >= band, other, None, _GROUND_MATERIAL[other], cv.color(other))

    things: list[str] = []
    for key in keys:
        things += [key] * (2 if rng.random() < 0.3 else 1)
    if rng.random() < _DROP_KEY_P:
        dropped = keys[int(rng.integers(2))]
        things = [t for t in things if t != dropped]
    for other in _THINGS:
        if other not in keys and rng.random() < _DISTRACTOR_P:
            things.append(other)
    if rng.random() < _CLOUD_P:
        things += ["cloud"] * int(rng.integers(1, 3))

    placed = []
    for thing in things:
        u = rng.uniform(0.12, 0.88)
        if thing in ("sun", "cloud"):
            v = rng.uniform(0.08, max(0.1, horizon - 0.12))
            placed.append((-1.0, thing, u, v, rng.uniform(0.8, 1.2)))
        else:
            depth = rng.uniform(0.15, 1.0)
            vb = horizon + depth * (1.0 - horizon) - 0.02
            scale = rng.uniform(0.85, 1.15) * (0.7 + 0.5 * depth)
            placed.append((vb, thing, u, vb, scale))
    placed.sort(key=lambda p: p[0])
    for _, thing, u, v, scale in placed:
        _DRAW[thing](cv, u, v, scale)

    image = np.clip(np.rint(cv.image), 0, 255).astype(np.uint8)
    return Scene(
        image=image, objects=cv.objects, parts=cv.parts, materials=cv.materials, class_label=class_label, split=split
    )


def _scene_sample(scene: Scene, mask_size: tuple[int, int]) -> Sample:
    objects = resize_nearest(scene.objects, mask_size)
    parts = resize_nearest(scene.parts, mask_size)
    materials = resize_nearest(scene.materials, mask_size)
    maps = [
        objects,
        np.where(parts > 0, parts + _PART_OFFSET, 0),
        np.where(materials > 0, materials + _MAT_OFFSET, 0),
        color_index_map(scene.image, mask_size) + _COLOR_OFFSET,
    ]
    maps = [m.astype(np.int32) for m in maps if m.any()]
    return Sample(
        image=scene.image,
        label_maps=np.stack(maps),
        image_labels=np.array([_SCENE_OFFSET + 1 + scene.class_label], np.int32),
        class_label=scene.class_label,
    )


class SyntheticScenes(ConceptDataset):
    """Synthetic scenes rendered on the fly (the same pixels :func:`generate` writes).

    Args:
        n_images: number of scenes in the family (before split filtering).
        seed: family seed.
        image_size: (H, W), both even; masks are (H // 2, W // 2).
        split: keep only scenes of this split ("train" or "val"), or all.
        split_fraction: probability that a scene is in "val".
        max_images: keep at most this many (the first) scenes after filtering.

    Attributes:
        indices: the scene index of every kept sample.
        splits: the split of every kept sample.
    """

    def __init__(
        self,
        n_images: int = 2000,
        seed: int = 0,
        image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
        split: str | None = None,
        split_fraction: float = 0.2,
        max_images: int | None = None,
    ) -> None:
        if n_images < 1:
            raise ValueError("n_images must be positive")
        h, w = (int(v) for v in image_size)
        if h < 8 or w < 8 or h % 2 or w % 2:
            raise ValueError("image_size must be even and at least 8x8")
        self.name = f"synthetic-{n_images}-{seed}"
        self.seed = int(seed)
        self.image_size = (h, w)
        self.mask_size = (h // 2, w // 2)
        self.split_fraction = float(split_fraction)
        self.concepts = synthetic_concepts()
        self.categories = list(CATEGORIES)
        self.classes = list(SCENE_CLASSES)
        all_splits = [self._split_of(i) for i in range(n_images)]
        self.indices = [i for i in range(n_images) if split is None or all_splits[i] == split]
        if max_images is not None:
            self.indices = self.indices[:max_images]
        self.splits = [all_splits[i] for i in self.indices]

    def _split_of(self, index: int) -> str:
        rng = np.random.default_rng([self.seed, index])
        return "val" if rng.random() < self.split_fraction else "train"

    def __len__(self) -> int:
        return len(self.indices)

    def scene(self, index: int) -> Scene:
        """The full-resolution scene behind a sample.

        Args:
            index: sample index (after split filtering).

        Returns:
            The :class:`Scene`: image and object/part/material labels [H, W].
        """
        return render_scene(self.seed, self.indices[index], self.image_size, self.split_fraction)

    def __getitem__(self, index: int) -> Sample:
        return _scene_sample(self.scene(self._checked_index(index)), self.mask_size)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def generate(
    out_dir: str | os.PathLike[str],
    *,
    n_images: int = 2000,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    split_fraction: float = 0.2,
) -> Path:
    """Write a synthetic scene family as a Broden directory.

    Args:
        out_dir: output directory; must not exist or be empty.
        n_images: number of scenes.
        seed: family seed.
        image_size: (H, W), both even.
        split_fraction: probability that a scene is in "val".

    Returns:
        The written directory; ``BrodenDataset(out_dir)[i]`` equals
        ``SyntheticScenes(n_images, seed, image_size)[i]``.
    """
    scenes = SyntheticScenes(n_images, seed, image_size, split_fraction=split_fraction)
    return write_broden(
        out_dir,
        ((scenes.splits[i], scenes[i]) for i in range(len(scenes))),
        scenes.concepts,
        scenes.categories,
        scenes.image_size,
        scenes.mask_size,
        classes=scenes.classes,
    )

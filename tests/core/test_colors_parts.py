"""Colour-name concepts and the paper's object-part expansion, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from dissect_core import parts as parts_module
from dissect_core.colors import (
    COLOR_CONCEPT_NAMES,
    COLOR_NAMES,
    COLOR_PROTOTYPES,
    WithColorConcepts,
    area_downsample,
    color_index_map,
    rgb_to_lab,
)
from dissect_core.concepts import Concept, ConceptDataset, Sample
from dissect_core.parts import WithPartConcepts, connected_components, quad_part_maps


class _Tiny(ConceptDataset):
    def __init__(self, concepts: list[Concept], samples: list[Sample], mask_size: tuple[int, int]) -> None:
        self.name = "tiny"
        self.concepts = concepts
        self.categories = sorted({c.category for c in concepts})
        self.classes = ["a"]
        self._samples = samples
        self.mask_size = mask_size
        self.image_size = samples[0].image.shape[:2]

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:
        return self._samples[index]


def test_prototype_colours_get_their_own_names() -> None:
    rgb = np.array([p for _, p in COLOR_PROTOTYPES], np.uint8)[None]
    got = color_index_map(rgb, (1, len(COLOR_PROTOTYPES)))[0]
    assert [COLOR_NAMES[i - 1] for i in got] == [name for name, _ in COLOR_PROTOTYPES]


@pytest.mark.parametrize(
    "rgb,name",
    [
        ((255, 0, 0), "red"),
        ((0, 255, 0), "green"),
        ((0, 0, 255), "blue"),
        ((255, 255, 0), "yellow"),
        ((0, 0, 0), "black"),
        ((255, 255, 255), "white"),
        ((128, 128, 128), "grey"),
        ((255, 128, 0), "orange"),
        ((128, 0, 128), "purple"),
        ((255, 105, 180), "pink"),
        ((139, 69, 19), "brown"),
    ],
)
def test_obvious_colours(rgb: tuple[int, int, int], name: str) -> None:
    image = np.array(rgb, np.uint8).reshape(1, 1, 3)
    assert COLOR_NAMES[color_index_map(image, (1, 1))[0, 0] - 1] == name


def test_lab_of_white_and_black() -> None:
    np.testing.assert_allclose(rgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=1e-3)
    np.testing.assert_allclose(rgb_to_lab(np.array([0, 0, 0])), [0, 0, 0], atol=1e-9)


def test_colour_map_is_computed_on_area_averages() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :2] = (255, 0, 0)
    image[:2, 2:] = (0, 0, 255)
    image[2:, :] = 255
    image[3, 3] = 0
    np.testing.assert_allclose(area_downsample(image, (2, 2))[1, 1], [191.25] * 3)
    got = color_index_map(image, (2, 2))
    names = [[COLOR_NAMES[i - 1] for i in row] for row in got]
    assert names == [["red", "blue"], ["white", "grey"]]
    assert got.shape == (2, 2) and got.dtype == np.int32
    odd = color_index_map(np.full((6, 9, 3), 255, np.uint8), (4, 4))
    assert odd.shape == (4, 4) and (odd == COLOR_NAMES.index("white") + 1).all()


def test_with_color_concepts_appends_numbers_and_a_map() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[:, 2:] = (250, 225, 40)
    sample = Sample(image=image, label_maps=np.array([[[1, 0], [0, 2]]], np.int32))
    base = _Tiny([Concept(1, "sky", "object"), Concept(2, "tree", "object")], [sample], (2, 2))
    ds = WithColorConcepts(base)
    assert ds.added
    assert [c.number for c in ds.concepts] == list(range(1, 14))
    assert [c.name for c in ds.concepts[2:]] == list(COLOR_CONCEPT_NAMES)
    assert {c.category for c in ds.concepts[2:]} == {"color"}
    assert ds.categories[-1] == "color"
    got = ds[0]
    black, yellow = 2 + COLOR_NAMES.index("black") + 1, 2 + COLOR_NAMES.index("yellow") + 1
    np.testing.assert_array_equal(got.label_maps, [[[1, 0], [0, 2]], [[black, yellow], [black, yellow]]])

    again = WithColorConcepts(ds)
    assert not again.added and again.concepts == ds.concepts
    assert again[0].label_maps.shape == (2, 2, 2)

    empty = _Tiny(
        [Concept(1, "sky", "object")], [Sample(image=image, label_maps=np.zeros((0, 2, 2), np.int32))], (2, 2)
    )
    assert WithColorConcepts(empty)[0].label_maps.shape == (1, 2, 2)


def test_existing_gray_concept_counts_as_colour() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    base = _Tiny([Concept(1, "gray-c", "colour-ish")], [Sample(image=image, label_maps=np.zeros((0, 1, 1)))], (1, 1))
    assert not WithColorConcepts(base).added


T, B, L, R = 10, 11, 12, 13


def test_quad_parts_two_components_hand_checked() -> None:
    o = 1
    label_map = np.array(
        [
            [o, o, o, 0, 0, 0, 0],
            [o, o, o, 0, 0, 2, 0],
            [o, o, o, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, o, o, 0],
            [0, 0, 0, 0, o, 0, 0],
        ]
    )
    base = np.zeros(3, np.int32)
    base[o] = T
    got = quad_part_maps(label_map, base)
    assert got.shape == (2, 6, 7) and got.dtype == np.int32
    np.testing.assert_array_equal(
        got[0],
        [
            [T, T, T, 0, 0, 0, 0],
            [B, B, B, 0, 0, 0, 0],
            [B, B, B, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, T, T, 0],
            [0, 0, 0, 0, B, 0, 0],
        ],
    )
    np.testing.assert_array_equal(
        got[1],
        [
            [L, R, R, 0, 0, 0, 0],
            [L, R, R, 0, 0, 0, 0],
            [L, R, R, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, L, R, 0],
            [0, 0, 0, 0, L, 0, 0],
        ],
    )


def test_diagonal_pixels_are_one_component() -> None:
    label_map = np.array(
        [
            [1, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 0, 1],
        ]
    )
    _, n = connected_components(label_map == 1)
    assert n == 1
    got = quad_part_maps(label_map, np.array([0, T]))
    np.testing.assert_array_equal(np.diag(got[0]), [T, T, B, B])
    np.testing.assert_array_equal(np.diag(got[1]), [L, L, R, R])


def test_numpy_components_match_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    masks = [rng.random((17, 23)) < p for p in (0.2, 0.4, 0.6)]
    masks.append(np.zeros((5, 5), bool))
    expected = [connected_components(m) for m in masks]
    monkeypatch.setattr(parts_module, "_ndimage", None)
    for m, (labels, n) in zip(masks, expected, strict=True):
        got, got_n = connected_components(m)
        assert got_n == n
        np.testing.assert_array_equal(got, labels)
    label_map = rng.choice([0, 1, 2], size=(12, 12))
    base = np.array([0, 20, 30])
    fallback = quad_part_maps(label_map, base)
    monkeypatch.undo()
    np.testing.assert_array_equal(fallback, quad_part_maps(label_map, base))


def test_with_part_concepts() -> None:
    """One-row and one-pixel components: the reference's split puts them wholly in the bottom
    (and, one column wide, right) half."""
    concepts = [Concept(1, "house", "object"), Concept(2, "roof", "part"), Concept(3, "tree", "object")]
    objects = np.array([[1, 1], [3, 0]], np.int32)
    roofs = np.array([[2, 0], [0, 0]], np.int32)
    sample = Sample(image=np.zeros((4, 4, 3), np.uint8), label_maps=np.stack([objects, roofs]), class_label=0)
    ds = WithPartConcepts(_Tiny(concepts, [sample], (2, 2)))
    assert [(c.number, c.name, c.category) for c in ds.concepts[3:]] == [
        (4, "house-t", "part"),
        (5, "house-b", "part"),
        (6, "house-l", "part"),
        (7, "house-r", "part"),
        (8, "tree-t", "part"),
        (9, "tree-b", "part"),
        (10, "tree-l", "part"),
        (11, "tree-r", "part"),
    ]
    got = ds[0]
    assert got.label_maps.shape == (4, 2, 2)
    np.testing.assert_array_equal(got.label_maps[:2], sample.label_maps)
    np.testing.assert_array_equal(got.label_maps[2], [[5, 5], [9, 0]])
    np.testing.assert_array_equal(got.label_maps[3], [[6, 7], [11, 0]])
    assert got.class_label == 0

"""Broden reader and writer: round trip, a hand-written directory, and every bad-file case."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dissect_core import broden
from dissect_core.broden import (
    BrodenDataset,
    read_label_png,
    resize_nearest,
    write_broden,
    write_label_png,
)
from dissect_core.concepts import Concept, Sample
from dissect_core.errors import DatasetError


def _samples(n: int, rng: np.random.Generator) -> list[tuple[str, Sample]]:
    out = []
    for i in range(n):
        image = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
        objects = rng.choice([0, 1, 2, 3], size=(4, 6)).astype(np.int32)
        objects[0, 0] = 1
        parts = rng.choice([0, 4, 5], size=(4, 6)).astype(np.int32)
        parts[0, 0] = 5
        maps = [objects, parts]
        if i % 2:
            second = np.zeros((4, 6), np.int32)
            second[1:3, 2:4] = 2
            maps.append(second)
        maps = sorted(maps, key=lambda m: 0 if m.max() <= 3 else 1)
        out.append(
            (
                "train" if i < n - 2 else "val",
                Sample(
                    image=image,
                    label_maps=np.stack(maps),
                    image_labels=np.array([6 + (i % 2)], np.int32),
                    class_label=i % 2,
                ),
            )
        )
    return out


CONCEPTS = [
    Concept(1, "sky", "object"),
    Concept(2, "tree", "object"),
    Concept(3, "car", "object"),
    Concept(4, "roof", "part"),
    Concept(5, "wheel", "part"),
    Concept(6, "street-s", "scene"),
    Concept(7, "park-s", "scene"),
]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    samples = _samples(6, np.random.default_rng(0))
    root = write_broden(
        tmp_path / "b", samples, CONCEPTS, ["object", "part", "scene"], (8, 12), (4, 6), classes=["street", "park"]
    )
    ds = BrodenDataset(root)
    assert len(ds) == 6
    assert ds.concepts == CONCEPTS
    assert ds.categories == ["object", "part", "scene"]
    assert ds.classes == ["street", "park"]
    assert ds.image_size == (8, 12) and ds.mask_size == (4, 6)
    assert ds.splits == ["train"] * 4 + ["val"] * 2
    for i, (_, expected) in enumerate(samples):
        got = ds[i]
        assert got.image.dtype == np.uint8 and got.image.shape == (8, 12, 3)
        np.testing.assert_array_equal(got.image, expected.image)
        assert got.label_maps.dtype == np.int32
        np.testing.assert_array_equal(got.label_maps, expected.label_maps)
        np.testing.assert_array_equal(got.image_labels, expected.image_labels)
        assert got.class_label == expected.class_label
    val = BrodenDataset(root, split="val")
    assert len(val) == 2
    np.testing.assert_array_equal(val[1].image, samples[5][1].image)
    assert len(BrodenDataset(root, max_images=3)) == 3
    assert ds.validate(full=True) == 6 + sum(len(s.label_maps) for _, s in samples)


def test_writer_splits_mixed_maps_and_adds_scene_concepts(tmp_path: Path) -> None:
    concepts = CONCEPTS[:5]
    mixed = np.array([[1, 4], [5, 0]], np.int32)
    sample = Sample(image=np.zeros((4, 4, 3), np.uint8), label_maps=mixed[None], class_label=0)
    write_broden(tmp_path / "m", [("train", sample)], concepts, ["object", "part"], (4, 4), (2, 2), classes=["street"])
    ds = BrodenDataset(tmp_path / "m")
    assert ds.concepts[-1] == Concept(6, "street-s", "scene")
    got = ds[0]
    np.testing.assert_array_equal(got.label_maps, [[[1, 0], [0, 0]], [[0, 4], [5, 0]]])
    np.testing.assert_array_equal(got.image_labels, [6])
    assert got.class_label == 0


def test_writer_refuses_nonempty_dir_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DatasetError):
        write_broden(tmp_path / "full", [], CONCEPTS, ["object"], (4, 4), (2, 2))
    bad = Sample(image=np.zeros((5, 4, 3), np.uint8), label_maps=np.zeros((0, 2, 2), np.int32))
    with pytest.raises(ValueError):
        write_broden(tmp_path / "out", [("train", bad)], CONCEPTS, ["object"], (4, 4), (2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def _write_csv(path: Path, rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _rgb_mask(labels: np.ndarray) -> Image.Image:
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb)


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    """A hand-written Broden dir: non-dense label numbers, a label > 255, multi-category
    labels, a whole-image scene column, a texture column, and two mask files in one cell."""
    root = tmp_path / "tiny"
    (root / "images" / "set").mkdir(parents=True)
    _write_csv(
        root / "label.csv",
        [
            ["number", "name", "category", "frequency", "coverage", "syns"],
            [0, "-", "", 0, 0, ""],
            [3, "sky", "object(2)", 2, 1.0, ""],
            [7, "wheel", "object(1);part(2)", 2, 0.1, ""],
            [300, "window", "part(1)", 1, 0.1, "pane"],
            [12, "street-s", "object(1);scene(1)", 1, 1.0, ""],
            [13, "park-s", "scene(1)", 1, 1.0, ""],
            [20, "banded", "texture(1)", 1, 1.0, ""],
            [21, "red-c", "", 0, 0, ""],
        ],
    )
    _write_csv(
        root / "category.csv",
        [
            ["name", "first", "last", "count", "frequency"],
            ["object", 3, 7, 2, 2],
            ["part", 7, 300, 2, 2],
            ["scene", 12, 13, 2, 2],
            ["texture", 20, 20, 1, 1],
        ],
    )
    _write_csv(root / "c_color.csv", [["code", "number", "name", "frequency", "coverage"], [1, 21, "red-c", 0, 0]])
    Image.fromarray(np.full((4, 4, 3), 10, np.uint8)).save(root / "images" / "set" / "a.png")
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(root / "images" / "set" / "b.png")
    _rgb_mask(np.array([[3, 3], [0, 7]])).save(root / "images" / "set" / "a_object.png")
    _rgb_mask(np.array([[0, 300], [7, 0]])).save(root / "images" / "set" / "a_part.png")
    _rgb_mask(np.array([[7, 0], [0, 0]])).save(root / "images" / "set" / "a_part2.png")
    _rgb_mask(np.array([[3, 3, 3, 3]] * 4)).save(root / "images" / "set" / "b_object.png")
    _write_csv(
        root / "index.csv",
        [
            ["image", "split", "ih", "iw", "sh", "sw", "object", "part", "scene", "texture"],
            ["set/a.png", "train", 4, 4, 2, 2, "set/a_object.png", "set/a_part.png;set/a_part2.png", "12", "20"],
            ["set/b.png", "val", 4, 4, 4, 4, "set/b_object.png", "", "13", ""],
        ],
    )
    return root


def test_reads_hand_written_dir(tiny: Path) -> None:
    ds = BrodenDataset(tiny)
    assert [(c.number, c.name, c.category) for c in ds.concepts] == [
        (1, "sky", "object"),
        (2, "wheel", "part"),
        (3, "street-s", "scene"),
        (4, "park-s", "scene"),
        (5, "banded", "texture"),
        (6, "red-c", "color"),
        (7, "window", "part"),
    ]
    assert ds.label_numbers == {1: 3, 2: 7, 3: 12, 4: 13, 5: 20, 6: 21, 7: 300}
    assert ds.categories == ["object", "part", "scene", "texture", "color"]
    assert ds.classes == ["street", "park"]
    assert ds.image_size == (4, 4) and ds.mask_size == (2, 2)

    a = ds[0]
    np.testing.assert_array_equal(a.image, np.full((4, 4, 3), 10, np.uint8))
    np.testing.assert_array_equal(a.label_maps, [[[1, 1], [0, 2]], [[0, 7], [2, 0]], [[2, 0], [0, 0]]])
    np.testing.assert_array_equal(a.image_labels, [3, 5])
    assert a.class_label == 0

    b = ds[1]
    np.testing.assert_array_equal(b.label_maps, np.ones((1, 2, 2)))
    np.testing.assert_array_equal(b.image_labels, [4])
    assert b.class_label == 1
    assert ds.validate(full=True) == 6

    resized = BrodenDataset(tiny, split="val", image_size=(6, 8))
    assert len(resized) == 1 and resized[0].image.shape == (6, 8, 3)
    assert resized.mask_size == (4, 4)


def test_resize_nearest_samples_centres() -> None:
    labels = np.arange(16).reshape(4, 4)
    np.testing.assert_array_equal(resize_nearest(labels, (2, 2)), [[5, 7], [13, 15]])
    np.testing.assert_array_equal(resize_nearest(np.array([[1, 2]]), (1, 4)), [[1, 1, 2, 2]])


def test_label_png_encoding(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 255], [256, 300, 65535]])
    write_label_png(tmp_path / "m.png", labels)
    np.testing.assert_array_equal(read_label_png(tmp_path / "m.png"), labels)
    rgb = np.asarray(Image.open(tmp_path / "m.png"))
    assert rgb[1, 1].tolist() == [300 % 256, 1, 0]


def _expect_error(root: Path, name: str, **kwargs: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        ds = BrodenDataset(root, **kwargs)
        for i in range(len(ds)):
            ds[i]
    assert name in info.value.message
    assert info.value.details["path"].endswith(name)
    return info.value


def test_missing_index_and_label_files(tiny: Path) -> None:
    (tiny / "index.csv").rename(tiny / "index.bak")
    _expect_error(tiny, "index.csv")
    (tiny / "index.bak").rename(tiny / "index.csv")
    (tiny / "label.csv").unlink()
    _expect_error(tiny, "label.csv")


def test_missing_directory(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope", "nope")


def test_missing_image_and_mask_detected_on_open(tiny: Path) -> None:
    (tiny / "images" / "set" / "a_part2.png").unlink()
    err = _expect_error(tiny, "a_part2.png")
    assert "does not exist" in err.message
    (tiny / "images" / "set" / "b.png").unlink()
    _expect_error(tiny, "b.png", split="val")


def test_corrupt_png(tiny: Path) -> None:
    (tiny / "images" / "set" / "a_object.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    ds = BrodenDataset(tiny)
    with pytest.raises(DatasetError) as info:
        ds.validate(full=True)
    assert "a_object.png" in info.value.message
    _expect_error(tiny, "a_object.png")


def test_corrupt_image(tiny: Path) -> None:
    (tiny / "images" / "set" / "b.png").write_bytes(b"garbage")
    _expect_error(tiny, "b.png")


def test_mask_with_wrong_shape(tiny: Path) -> None:
    _rgb_mask(np.zeros((3, 2), int)).save(tiny / "images" / "set" / "a_object.png")
    err = _expect_error(tiny, "a_object.png")
    assert "3x2" in err.message


def test_mask_label_not_in_label_csv(tiny: Path) -> None:
    _rgb_mask(np.array([[3, 999], [0, 0]])).save(tiny / "images" / "set" / "a_object.png")
    err = _expect_error(tiny, "a_object.png")
    assert "999" in err.message


def test_whole_image_label_not_in_label_csv(tiny: Path) -> None:
    text = (tiny / "index.csv").read_text().replace(",13,", ",14,")
    (tiny / "index.csv").write_text(text)
    err = _expect_error(tiny, "index.csv")
    assert "14" in err.message


def test_path_outside_images_is_refused(tiny: Path) -> None:
    text = (tiny / "index.csv").read_text().replace("set/b_object.png", "../label.csv")
    (tiny / "index.csv").write_text(text)
    _expect_error(tiny, "index.csv")


def test_bad_index_header(tiny: Path) -> None:
    text = (tiny / "index.csv").read_text().replace("image,split", "img,split")
    (tiny / "index.csv").write_text(text)
    _expect_error(tiny, "index.csv")


def test_unknown_split(tiny: Path) -> None:
    err = _expect_error(tiny, "index.csv", split="test")
    assert "test" in err.message


def test_decompression_bomb_is_refused(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broden, "MAX_IMAGE_PIXELS", 8)
    err = _expect_error(tiny, "a.png")
    assert "decompression bomb" in err.message

"""Image folders with and without masks, and dataset specs (open_dataset)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dissect_core.colors import COLOR_CONCEPT_NAMES
from dissect_core.concepts import Concept
from dissect_core.datasets import open_dataset
from dissect_core.errors import DatasetError
from dissect_core.imagefolder import ImageFolderDataset
from dissect_core.synthetic import SyntheticScenes, generate


def _mask(path: Path, labels: np.ndarray) -> None:
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb).save(path)


def _folder(root: Path, masks: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((4, 6, 3), 30, np.uint8)).save(root / "images" / "b.png")
    Image.fromarray(np.full((8, 12, 3), 90, np.uint8)).save(root / "images" / "a.jpg")
    (root / "images" / "notes.txt").write_text("not an image")
    if masks:
        (root / "masks").mkdir()
        (root / "labels.json").write_text(
            json.dumps(
                [
                    {"number": 5, "name": "tree", "category": "object"},
                    {"number": 300, "name": "leaf", "category": "part"},
                    {"number": 2, "name": "sky"},
                ]
            )
        )
        _mask(root / "masks" / "a.png", np.array([[2, 5, 0], [300, 5, 2]]))
        _mask(root / "masks" / "b_part.png", np.array([[0, 300, 0], [0, 0, 0]]))
        _mask(root / "masks" / "b_object.png", np.array([[5, 5, 2], [0, 0, 0]]))
    return root


def test_single_and_per_category_masks(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_folder(tmp_path / "f"))
    assert ds.image_names == ["a.jpg", "b.png"]
    assert ds.concepts == [Concept(1, "sky", "object"), Concept(2, "tree", "object"), Concept(3, "leaf", "part")]
    assert ds.categories == ["object", "part"]
    assert ds.image_size == (8, 12) and ds.mask_size == (2, 3)
    a, b = ds[0], ds[1]
    assert a.image.shape == (8, 12, 3) and b.image.shape == (8, 12, 3)
    np.testing.assert_array_equal(a.label_maps, [[[1, 2, 0], [3, 2, 1]]])
    np.testing.assert_array_equal(b.label_maps, [[[2, 2, 1], [0, 0, 0]], [[0, 3, 0], [0, 0, 0]]])
    assert b.class_label == -1 and len(b.image_labels) == 0
    assert ds.validate(full=True) == 5


def test_labels_csv_and_mask_resize(tmp_path: Path) -> None:
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "x.png")
    (root / "labels.csv").write_text("number,name,category\n7,car,object\n")
    _mask(root / "masks" / "x.png", np.array([[7, 0], [0, 7]]))
    ds = ImageFolderDataset(root, mask_size=(4, 4))
    np.testing.assert_array_equal(ds[0].label_maps[0], np.kron([[1, 0], [0, 1]], np.ones((2, 2))))


def test_folder_without_masks(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_folder(tmp_path / "f", masks=False), image_size=(8, 8))
    assert ds.concepts == [] and ds.mask_size == (4, 4)
    assert ds[1].label_maps.shape == (0, 4, 4)
    coloured = open_dataset(f"imagefolder:{tmp_path / 'f'}", colors=True)
    assert [c.name for c in coloured.concepts] == list(COLOR_CONCEPT_NAMES)
    assert coloured[0].label_maps.shape == (1, 4, 6)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="images/"):
        ImageFolderDataset(tmp_path / "none")
    root = _folder(tmp_path / "f")
    (root / "labels.json").unlink()
    with pytest.raises(DatasetError, match=r"labels\.json"):
        ImageFolderDataset(root)
    root = _folder(tmp_path / "g")
    _mask(root / "masks" / "a.png", np.array([[9, 0, 0], [0, 0, 0]]))
    ds = ImageFolderDataset(root)
    with pytest.raises(DatasetError) as info:
        ds[0]
    assert "a.png" in info.value.message and info.value.details["path"].endswith("a.png")
    (root / "images" / "b.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"b\.png"):
        ds[1]
    (root / "labels.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"labels\.json"):
        ImageFolderDataset(root)


def test_open_dataset_specs(tmp_path: Path) -> None:
    generate(tmp_path / "syn", n_images=10, seed=3)
    broden = open_dataset(f"broden:{tmp_path / 'syn'}", max_images=4)
    synthetic_dir = open_dataset(f"synthetic:{tmp_path / 'syn'}", split="train")
    memory = open_dataset("synthetic:10:3", split="train")
    assert len(broden) == 4
    assert len(synthetic_dir) == len(memory) == len(SyntheticScenes(10, 3, split="train"))
    np.testing.assert_array_equal(synthetic_dir[0].label_maps, memory[0].label_maps)
    assert len(open_dataset("synthetic:7")) == 7
    assert open_dataset("synthetic:6", image_size=(32, 32))[0].image.shape == (32, 32, 3)

    both = open_dataset("synthetic:4:1", colors=True, parts=True)
    names = [c.name for c in both.concepts]
    assert names.count("red-c") == 1, "synthetic scenes bring their own colours"
    assert "house-t" in names and "cloud-r" in names
    assert both[0].label_maps.shape[0] >= 5

    for spec, needle in [
        ("nope:x", "unknown dataset spec"),
        ("broden", "unknown dataset spec"),
        (f"broden:{tmp_path / 'missing'}", "missing"),
        ("imagefolder:", "names no directory"),
        (f"synthetic:{tmp_path / 'missing'}", "missing"),
    ]:
        with pytest.raises(DatasetError, match=needle):
            open_dataset(spec)
    with pytest.raises(DatasetError, match="no splits"):
        open_dataset(f"imagefolder:{tmp_path / 'syn'}", split="val")

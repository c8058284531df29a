"""Synthetic scenes: determinism, agreement of masks and pixels, and the Broden round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dissect_core.broden import BrodenDataset, resize_nearest
from dissect_core.colors import color_index_map
from dissect_core.synthetic import (
    MATERIAL_NAMES,
    OBJECT_NAMES,
    PART_NAMES,
    SCENE_CLASSES,
    SyntheticScenes,
    generate,
    render_scene,
    synthetic_concepts,
)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    generate(tmp_path / "a", n_images=12, seed=5)
    generate(tmp_path / "b", n_images=12, seed=5)
    generate(tmp_path / "c", n_images=12, seed=6)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() != c.keys() or any(a[k] != c[k] for k in a)
    assert not np.array_equal(render_scene(5, 0).image, render_scene(6, 0).image)
    assert not np.array_equal(render_scene(5, 0).image, render_scene(5, 1).image)


def test_written_files_equal_in_memory_samples(tmp_path: Path) -> None:
    root = generate(tmp_path / "syn", n_images=25, seed=1)
    disk = BrodenDataset(root)
    memory = SyntheticScenes(25, seed=1)
    assert disk.concepts == memory.concepts == synthetic_concepts()
    assert disk.categories == memory.categories
    assert disk.classes == memory.classes == list(SCENE_CLASSES)
    assert disk.image_size == memory.image_size == (64, 64)
    assert disk.mask_size == memory.mask_size == (32, 32)
    assert disk.splits == memory.splits
    for i in range(len(memory)):
        d, m = disk[i], memory[i]
        np.testing.assert_array_equal(d.image, m.image)
        np.testing.assert_array_equal(d.label_maps, m.label_maps)
        np.testing.assert_array_equal(d.image_labels, m.image_labels)
        assert d.class_label == m.class_label
    val_disk, val_memory = BrodenDataset(root, split="val"), SyntheticScenes(25, seed=1, split="val")
    assert len(val_disk) == len(val_memory) > 0
    np.testing.assert_array_equal(val_disk[0].label_maps, val_memory[0].label_maps)


def test_masks_agree_with_pixels() -> None:
    ds = SyntheticScenes(30, seed=2)
    concepts = ds.concepts
    color_offset = len(OBJECT_NAMES) + len(PART_NAMES) + len(MATERIAL_NAMES)
    sky = OBJECT_NAMES.index("sky") + 1
    for i in range(len(ds)):
        scene, sample = ds.scene(i), ds[i]
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        assert sample.label_maps.dtype == np.int32 and sample.label_maps.shape[1:] == (32, 32)
        np.testing.assert_array_equal(sample.label_maps[0], resize_nearest(scene.objects, (32, 32)))
        assert (sample.label_maps[0] > 0).all()
        np.testing.assert_array_equal(sample.label_maps[-1] - color_offset, color_index_map(scene.image, (32, 32)))
        expected = ["object", "part", "material", "color"]
        if not (scene.parts > 0).any():
            expected.remove("part")
        assert len(sample.label_maps) == len(expected)
        for label_map, category in zip(sample.label_maps, expected, strict=True):
            assert {concepts[n - 1].category for n in np.unique(label_map) if n} == {category}
        for row in range(64):
            pixels = scene.image[row][scene.objects[row] == sky]
            assert len(np.unique(pixels, axis=0)) <= 1, "sky pixels of one row are painted by one painter"
        assert ((scene.parts > 0) <= (scene.objects > OBJECT_NAMES.index("sand") + 1)).all()
        assert sample.image_labels.tolist() == [len(concepts) - len(SCENE_CLASSES) + 1 + scene.class_label]
        assert sample.class_label == scene.class_label


def test_scene_classes_follow_their_key_objects() -> None:
    keys = {
        "street": ("house", "car"),
        "park": ("tree", "person"),
        "harbor": ("boat", "house"),
        "countryside": ("house", "tree"),
        "beach": ("person", "sun"),
        "avenue": ("car", "tree"),
    }
    seen = {c: [0, 0] for c in SCENE_CLASSES}
    for i in range(300):
        scene = render_scene(0, i)
        name = SCENE_CLASSES[scene.class_label]
        present = {OBJECT_NAMES[o - 1] for o in np.unique(scene.objects)}
        seen[name][0] += 1
        seen[name][1] += all(k in present for k in keys[name])
    for name, (total, both) in seen.items():
        assert total > 20
        assert both / total > 0.75, name


def test_image_size_and_split_options() -> None:
    small = SyntheticScenes(10, seed=0, image_size=(32, 48))
    assert small[0].image.shape == (32, 48, 3) and small.mask_size == (16, 24)
    assert small[0].label_maps.shape[1:] == (16, 24)
    train, val = SyntheticScenes(40, split="train"), SyntheticScenes(40, split="val")
    assert len(train) + len(val) == 40 and set(train.indices).isdisjoint(val.indices)
    assert len(SyntheticScenes(40, max_images=3)) == 3
    with pytest.raises(ValueError):
        SyntheticScenes(10, image_size=(31, 32))
    with pytest.raises(IndexError):
        small[10]

"""The demo GAN and segmenter (dissect_core.gan) and the generator half of make_demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dissect_core.broden import resize_nearest
from dissect_core.demo import make_demo
from dissect_core.errors import Cancelled, DatasetError, ModelLoadError
from dissect_core.gan import (
    GENERATOR_ARCHS,
    build_generator,
    evaluate_segmentation,
    load_category_arrays,
    train_gan,
    train_segmenter,
)
from dissect_core.models import load_model
from dissect_core.nethook import trace
from dissect_core.segmenter import Segmenter
from dissect_core.synthetic import OBJECT_NAMES, SyntheticScenes

LAYERS = {"layer1": (256, 4), "layer2": (128, 8), "layer3": (64, 16), "layer4": (32, 32)}


def test_generator_layers_and_output() -> None:
    torch.manual_seed(0)
    gen = build_generator("dcgan", latent_dim=16).eval()
    z = torch.randn(5, 16)
    with torch.no_grad(), trace(gen, [*LAYERS, "output"]) as tr:
        out = tr(z)
    for name, (channels, size) in LAYERS.items():
        assert tr[name].shape == (5, channels, size, size), name
        assert tr[name].min() >= 0 and tr[name].max() > 0, name
    assert out.shape == (5, 3, 64, 64) and torch.equal(tr["output"], out)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0
    with torch.no_grad():
        torch.testing.assert_close(gen(z[:, :, None, None]), out, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"\[B, 16\]"):
            gen(torch.randn(5, 17))


def test_build_generator_names() -> None:
    assert "dcgan" in GENERATOR_ARCHS
    assert isinstance(build_generator("builtin:dcgan"), nn.Module)
    assert build_generator("builtin:dcgan", 32).latent.latent_dim == 32
    with pytest.raises(ModelLoadError, match="builtin:dcgan"):
        build_generator("builtin:stylegan")


def test_train_gan_is_deterministic_by_seed() -> None:
    scenes = SyntheticScenes(12, seed=2)
    threads = torch.get_num_threads()
    kwargs = {"latent_dim": 8, "steps": 3, "batch_size": 4, "stat_samples": 64, "threads": 1}
    gen, info = train_gan(scenes, seed=0, **kwargs)
    again, _ = train_gan(scenes, seed=0, **kwargs)
    other, _ = train_gan(scenes, seed=1, **kwargs)
    assert torch.get_num_threads() == threads
    assert not gen.training
    assert info["steps"] == 3 and info["latent_dim"] == 8 and info["arch"] == "builtin:dcgan"
    assert np.isfinite(info["loss_d"]) and np.isfinite(info["loss_g"]) and info["seconds"] > 0
    state, state_again, state_other = gen.state_dict(), again.state_dict(), other.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(state_again[key], value, rtol=0, atol=0)
    assert any(not torch.equal(state_other[k], v) for k, v in state.items() if v.is_floating_point())
    fresh = build_generator("dcgan", 8).state_dict()
    assert not torch.equal(fresh["layer2.0.weight"], state["layer2.0.weight"])


def test_train_gan_refuses_and_stops() -> None:
    with pytest.raises(DatasetError, match="64x64"):
        train_gan(SyntheticScenes(4, image_size=(32, 32)), steps=1)
    with pytest.raises(Cancelled):
        train_gan(SyntheticScenes(4), latent_dim=8, steps=5, batch_size=2, should_stop=lambda: True)


def test_category_arrays_are_the_object_masks() -> None:
    scenes = SyntheticScenes(6, seed=4)
    images, targets, labels = load_category_arrays(scenes, "object")
    assert labels == ["-", *OBJECT_NAMES]
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert targets.shape == (6, 32, 32) and targets.dtype == torch.int64
    for i in range(6):
        sample = scenes[i]
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), sample.image)
        assert np.array_equal(targets[i].numpy(), sample.label_maps[0])
    _, parts, part_labels = load_category_arrays(scenes, "part")
    assert part_labels[1] == "wall" and int(parts.max()) <= len(part_labels) - 1
    with pytest.raises(DatasetError, match="no concept of category 'animal'"):
        load_category_arrays(scenes, "animal")


def test_evaluate_segmentation_of_a_constant_segmenter() -> None:
    k, num_classes = 2, 4
    head = nn.Conv2d(3, num_classes, 1)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.eye(num_classes)[k])
    module = nn.Sequential(nn.AvgPool2d(4), head)
    targets = torch.zeros(2, 8, 8, dtype=torch.int64)
    targets[0, :4] = 2
    targets[1, :, :2] = 1
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    result = evaluate_segmentation(module, images, targets, num_classes, [0.5] * 3, [0.25] * 3)
    truth = np.stack([resize_nearest(t, (4, 4)) for t in targets.numpy()])
    share = float((truth == k).mean())
    assert result["pixel_accuracy"] == pytest.approx(share)
    assert result["iou"][k] == pytest.approx(share) and result["iou"][1] == 0.0 and result["iou"][3] is None
    assert result["miou"] == pytest.approx(share / 2)
    assert result["predicted_share"] == [0.0, 0.0, 1.0, 0.0]


def test_train_segmenter_beats_the_majority_class() -> None:
    train = SyntheticScenes(90, seed=5, split="train")
    val = SyntheticScenes(90, seed=5, split="val")
    module, info = train_segmenter(train, val_dataset=val, epochs=3, batch_size=16, lr=5e-3, seed=0)
    assert info["labels"] == ["-", *OBJECT_NAMES] and info["num_classes"] == 13
    assert info["categories"] == ["-"] + ["object"] * 12
    assert info["input_size"] == [64, 64] and len(info["mean"]) == 3 and len(info["std"]) == 3
    assert info["val_images"] == len(val) and info["train_images"] == len(train)
    _, targets, _ = load_category_arrays(val)
    majority = np.bincount(np.stack([resize_nearest(t, (16, 16)) for t in targets.numpy()]).ravel()).max() / (
        len(val) * 16 * 16
    )
    assert info["val_pixel_accuracy"] > majority + 0.1
    assert info["val_iou"][1] > 0.6  # sky
    segmenter = Segmenter(
        module,
        info["labels"],
        categories=info["categories"],
        mean=info["mean"],
        std=info["std"],
        input_size=tuple(info["input_size"]),
    )
    images = torch.from_numpy(np.stack([val[i].image for i in range(3)])).permute(0, 3, 1, 2)
    labels = segmenter.segment(images)
    assert labels.shape == (3, 1, 16, 16) and labels.dtype == torch.int32
    assert [c.name for c in segmenter.concepts] == list(OBJECT_NAMES)


def test_train_segmenter_holds_out_a_fraction() -> None:
    _, info = train_segmenter(SyntheticScenes(20, seed=6), epochs=1, val_fraction=0.25)
    assert info["val_images"] == 5 and info["train_images"] == 15 and 0 <= info["val_miou"] <= 1


def test_make_demo_generator_half(tmp_path: Path) -> None:
    lines: list[str] = []
    paths = make_demo(
        tmp_path / "demo", n_images=40, epochs=1, gan_steps=2, segmenter_epochs=1, threads=1, progress=lines.append
    )
    gen_config = json.loads(paths.generator_config.read_text())
    assert gen_config["threads"] == 1 and json.loads(paths.segmenter_config.read_text())["threads"] == 1
    assert gen_config["arch"] == "builtin:dcgan" and gen_config["output_range"] == [-1, 1]
    assert gen_config["output_size"] == [64, 64] and gen_config["steps"] == 2 and gen_config["layer"] in LAYERS
    gen = build_generator(gen_config["arch"], gen_config["latent_dim"])
    gen.load_state_dict(load_file(str(paths.generator)))
    seg_config = json.loads(paths.segmenter_config.read_text())
    assert seg_config["arch"] == "builtin:segnet" and seg_config["labels"] == ["-", *OBJECT_NAMES]
    assert len(seg_config["categories"]) == seg_config["num_classes"] == 13 and seg_config["categories"][0] == "-"
    assert seg_config["input_size"] == [64, 64] and 0 <= seg_config["val_miou"] <= 1
    loaded = load_model(
        seg_config["arch"],
        paths.segmenter,
        input_size=seg_config["input_size"],
        mean=seg_config["mean"],
        std=seg_config["std"],
    )
    assert loaded.num_classes == 13
    stamps = [p.stat().st_mtime_ns for p in (paths.generator, paths.segmenter)]
    lines.clear()
    make_demo(tmp_path / "demo", n_images=40, epochs=1, gan_steps=2, segmenter_epochs=1, progress=lines.append)
    assert lines == [] and [p.stat().st_mtime_ns for p in (paths.generator, paths.segmenter)] == stamps

"""Built-in architectures, classifier training and the demo, at toy sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dissect_core.archs import ARCHS, build_arch, scenecnn, segnet
from dissect_core.demo import make_demo
from dissect_core.errors import DatasetError, ModelLoadError
from dissect_core.synthetic import SyntheticScenes
from dissect_core.train import load_class_arrays, normalize, train_classifier


def test_scenecnn_layers_and_shapes() -> None:
    model = scenecnn(6).eval()
    names = dict(model.named_modules())
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc"):
        assert layer in names
    features = {}
    handle = model.conv5.register_forward_hook(lambda m, i, o: features.setdefault("conv5", o))
    try:
        with torch.no_grad():
            logits = model(torch.randn(2, 3, 64, 64))
    finally:
        handle.remove()
    assert logits.shape == (2, 6)
    assert features["conv5"].shape == (2, 128, 8, 8)
    assert (features["conv5"] >= 0).all()


def test_segnet_and_registry() -> None:
    with torch.no_grad():
        out = segnet(5).eval()(torch.randn(1, 3, 32, 48))
    assert out.shape == (1, 5, 8, 12)
    assert set(ARCHS) >= {"scenecnn", "segnet"}
    assert isinstance(build_arch("builtin:scenecnn", 3), torch.nn.Module)
    with pytest.raises(ModelLoadError, match="builtin:scenecnn"):
        build_arch("builtin:nope", 3)


def test_training_smoke_is_deterministic() -> None:
    train = SyntheticScenes(48, seed=0, image_size=(32, 32), split="train")
    val = SyntheticScenes(48, seed=0, image_size=(32, 32), split="val")
    lines: list[str] = []
    model, info = train_classifier(
        train, val_dataset=val, epochs=1, batch_size=16, lr=0.05, seed=1, progress=lines.append
    )
    assert not model.training
    assert info["arch"] == "builtin:scenecnn" and info["num_classes"] == 6
    assert info["classes"] == train.classes and info["input_size"] == [32, 32]
    assert len(info["mean"]) == len(info["std"]) == 3
    assert len(info["train_accuracy"]) == len(info["val_accuracy"]) == 1 and len(lines) == 1
    assert 0.0 <= info["val_accuracy"][0] <= 1.0
    again, _ = train_classifier(train, val_dataset=val, epochs=1, batch_size=16, lr=0.05, seed=1)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def _conv5_mean(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean conv5 activation with batch statistics, as in training (three epochs of toy
    training leave BatchNorm's running statistics far from them)."""
    seen: list[float] = []
    handle = model.conv5.register_forward_hook(lambda m, i, o: seen.append(float(o.mean())))
    model.train()
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
        model.eval()
    return seen[0]


def test_activation_l1_makes_the_layer_sparser() -> None:
    train = SyntheticScenes(48, seed=0, image_size=(32, 32), split="train")
    kwargs = {"epochs": 3, "batch_size": 16, "lr": 0.05, "seed": 1}
    plain, info = train_classifier(train, **kwargs)
    sparse, sparse_info = train_classifier(train, activation_l1=50.0, l1_layer="conv5", **kwargs)
    assert info["activation_l1"] == 0.0 and info["l1_layer"] is None
    assert sparse_info["activation_l1"] == 50.0 and sparse_info["l1_layer"] == "conv5"
    images, _ = load_class_arrays(train)
    x = normalize(images, info["mean"], info["std"])
    assert _conv5_mean(sparse, x) < 0.5 * _conv5_mean(plain, x)
    with pytest.raises(ValueError, match="l1_layer"):
        train_classifier(train, activation_l1=1.0, **kwargs)
    with pytest.raises(ValueError, match="l1_layer"):
        train_classifier(train, activation_l1=1.0, l1_layer="conv9", **kwargs)
    with pytest.raises(ValueError, match=">= 0"):
        train_classifier(train, activation_l1=-1.0, l1_layer="conv5", **kwargs)


def test_training_needs_classes() -> None:
    scenes = SyntheticScenes(4, image_size=(16, 16))
    scenes.classes = []
    with pytest.raises(DatasetError, match="scene classes"):
        train_classifier(scenes, epochs=1)


def test_make_demo_writes_and_reuses(tmp_path: Path) -> None:
    lines: list[str] = []
    paths = make_demo(tmp_path / "demo", n_images=40, epochs=1, generator=False, segmenter=False, progress=lines.append)
    assert (paths.data / "index.csv").is_file()
    config = json.loads(paths.config.read_text())
    assert config["arch"] == "builtin:scenecnn" and config["num_classes"] == 6
    assert config["input_size"] == [64, 64] and len(config["classes"]) == 6
    assert 0.0 <= config["val_accuracy"] <= 1.0
    model = build_arch(config["arch"], config["num_classes"])
    model.load_state_dict(load_file(str(paths.weights)))
    stamp = paths.weights.stat().st_mtime_ns
    lines.clear()
    make_demo(tmp_path / "demo", n_images=40, epochs=1, generator=False, segmenter=False, progress=lines.append)
    assert lines == [] and paths.weights.stat().st_mtime_ns == stamp

"""The targeted PGD attack and the unit-change analysis, on hand-built networks.

The colour network is the one of ``test_ablation.py`` (repeated here so each file
stands alone): units 2c and 2c + 1 copy input channel c and carry class c's logit;
class 3 ("dim") has a constant logit 0.8.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from dissect_core.ablation import unit_importance
from dissect_core.attack import (
    GROUPS,
    AttackAnalysis,
    attack_unit_changes,
    confidence_interval,
    pgd_attack,
    to_pixels,
)
from dissect_core.concepts import Concept, ConceptDataset, Sample
from dissect_core.models import LoadedModel
from dissect_core.nethook import trace

CHANNEL = [0, 0, 1, 1, 2, 2, 0, 1]
CLASSES = ["red", "green", "blue", "dim"]


def hand_net() -> nn.Module:
    conv = nn.Conv2d(3, 8, 1, bias=False)
    fc = nn.Linear(8, 4)
    with torch.no_grad():
        conv.weight.zero_()
        for k, ch in enumerate(CHANNEL):
            conv.weight[k, ch] = 1.0
        fc.weight.zero_()
        for c in range(3):
            fc.weight[c, 2 * c] = 1.0
            fc.weight[c, 2 * c + 1] = 0.6
        fc.weight[0, 6] = 0.1
        fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.8]))
    return nn.Sequential(
        OrderedDict(units=nn.Sequential(conv), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=fc)
    ).eval()


def hand_model(module: nn.Module | None = None) -> LoadedModel:
    return LoadedModel(
        module if module is not None else hand_net(),
        "test:hand",
        4,
        (8, 8),
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        "builtin",
        list(CLASSES),
    )


class Colours(ConceptDataset):
    """Constant-colour 8x8 images: class c < 3 has channel c high, class 3 none."""

    name = "colours"
    image_size = (8, 8)
    mask_size = (4, 4)
    concepts: ClassVar[list[Concept]] = [Concept(1, "thing", "object")]
    categories: ClassVar[list[str]] = ["object"]
    classes: ClassVar[list[str]] = CLASSES

    def __init__(self, n: int, seed: int, unlabelled: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % 4
        values = rng.uniform(0.05, 0.3, (n, 3))
        own = np.linspace(0.55, 1.0, n)
        rng.shuffle(own)
        for i, c in enumerate(self.labels):
            if c < 3:
                values[i, c] = own[i]
        self.pixels = np.rint(values * 255).astype(np.uint8)
        self.unlabelled = unlabelled

    def __len__(self) -> int:
        return len(self.labels) + self.unlabelled

    def __getitem__(self, index: int) -> Sample:
        i = index % len(self.labels)
        image = np.broadcast_to(self.pixels[i], (8, 8, 3)).copy()
        label = int(self.labels[i]) if index < len(self.labels) else -1
        return Sample(image, np.zeros((0, 4, 4), np.int32), class_label=label)


def linear_net() -> nn.Module:
    """logit 0 = sum(x) - 24, logit 1 = 24 - sum(x) on 3x4x4 images: class 1 iff the mean pixel < 0.5."""
    fc = nn.Linear(48, 2)
    with torch.no_grad():
        fc.weight[0].fill_(1.0)
        fc.weight[1].fill_(-1.0)
        fc.bias.copy_(torch.tensor([-24.0, 24.0]))
    return nn.Sequential(nn.Flatten(), fc).eval()


def test_pgd_succeeds_exactly_when_the_budget_allows() -> None:
    net = linear_net()
    x0 = torch.full((2, 3, 4, 4), 0.6)
    target = torch.tensor([1, 1])
    kwargs = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "step": 0.05, "iterations": 10}
    weak = pgd_attack(net, x0, target, eps=0.05, **kwargs)
    assert not weak.success.any()
    torch.testing.assert_close(weak.images, torch.full_like(x0, 0.55))
    strong = pgd_attack(net, x0, target, eps=0.2, **kwargs)
    assert strong.success.all()
    assert strong.steps.tolist() == [3, 3]
    torch.testing.assert_close(strong.images, torch.full_like(x0, 0.45))
    assert strong.logits.shape == (2, 2) and strong.images.shape == x0.shape
    free = pgd_attack(net, x0, target, eps=0.2, stop_on_success=False, **kwargs)
    torch.testing.assert_close(free.images, torch.full_like(x0, 0.4))
    assert (free.images - x0).abs().max() <= 0.2 + 1e-6
    edge = pgd_attack(net, torch.full((1, 3, 4, 4), 0.02), torch.tensor([0]), eps=0.5, **kwargs)
    assert edge.images.min() >= 0.0 and edge.images.max() <= 1.0
    assert all(p.grad is None for p in net.parameters())


def test_confidence_interval_is_the_normal_approximation() -> None:
    mean, low, high = confidence_interval([1.0, 2.0, 3.0, 4.0], 0.99)
    half = 2.5758293035489 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half) and high == pytest.approx(2.5 + half)
    assert np.isnan(confidence_interval([5.0])[1])
    assert np.isnan(confidence_interval([])[0])


def test_attack_unit_changes_on_the_hand_network() -> None:
    model = hand_model()
    train, val = Colours(48, 1), Colours(24, 5)
    importance = unit_importance(model, train, "units", device="cpu")
    result = attack_unit_changes(
        model,
        val,
        "units",
        importance,
        targets=3,
        top_k=2,
        eps=0.6,
        step=0.05,
        iterations=20,
        batch_size=8,
        device="cpu",
    )
    assert result.n_images == 24
    np.testing.assert_array_equal(result.source, val.labels[result.image_indices])
    assert set(result.source.tolist()) == {0, 1, 2}
    assert result.success.all() and result.success_rate == 1.0
    assert result.peak_change.shape == (18, 8) and result.clean_peaks.shape == (18, 8)
    assert (result.linf <= 0.6 + 1e-6).all()

    i = 0
    image = torch.from_numpy(val[int(result.image_indices[i])].image).permute(2, 0, 1)[None]
    x = to_pixels(image, (8, 8))
    with torch.no_grad(), trace(model.module, ["units"]) as tr:
        tr(x)
    np.testing.assert_allclose(result.clean_peaks[i], tr["units"].amax(dim=(2, 3))[0].numpy(), atol=1e-6)

    per = result.group_changes()
    assert per.shape == (18, 3)
    for row in range(18):
        s = int(result.source[row])
        src = np.abs(result.peak_change[row, [2 * s, 2 * s + 1]]).mean()
        assert per[row, 0] == pytest.approx(src, rel=1e-6)
        assert per[row, 0] > 0.04
    summary = result.summary()
    assert summary["success_rate"] == 1.0 and summary["images"] == 18
    for name in GROUPS:
        g = summary[name]
        assert g["low"] <= g["mean"] <= g["high"]
    again = AttackAnalysis.from_state_dict(result.state_dict())
    np.testing.assert_array_equal(again.peak_change, result.peak_change)

    random = attack_unit_changes(
        model,
        val,
        "units",
        importance.ranking,
        top_k=2,
        eps=0.6,
        step=0.05,
        iterations=20,
        max_images=7,
        seed=3,
        device="cpu",
    )
    assert len(random.source) == 7 and (random.target != random.source).all()

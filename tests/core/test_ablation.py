"""Unit ablation against answers known by construction.

The hand-built network: images are constant colours; the layer ``units`` is a 1x1
convolution whose unit k copies input channel ``CHANNEL[k]``; global average
pooling and a linear layer give logit c = 1.0 * u(2c) + 0.6 * u(2c + 1) for the
colour classes c = 0, 1, 2 (plus 0.1 * u6 for class 0), and a constant 0.8 for
class 3 ("dim": every channel low). A colour-c image has channel c in [0.55, 1]
and the others in [0.05, 0.3], so:

- removing unit 2c leaves logit c <= 0.7 < 0.8: every image of c goes to "dim",
  balanced accuracy exactly 0.5;
- removing unit 2c + 1 leaves logit c = v (or 1.1 v): only the images with v below
  the threshold are lost, balanced accuracy strictly between 0.5 and 1;
- every other unit leaves class c's predictions alone (balanced accuracy 1, the
  baseline): 6 tied units per colour class; unit 6 lowers class 0's margin by
  0.1 v, so it ranks third for class 0, before the zero-effect units.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from dissect_core.ablation import (
    AblationCounts,
    ClassAccuracy,
    ImportanceInterpretability,
    SetAblation,
    UnitImportance,
    ablate_sets,
    ablation_counts,
    all_class_accuracy,
    balanced_accuracy,
    class_accuracy,
    class_predictions,
    count_ties,
    importance_interpretability,
    rank_units,
    set_ablations,
    split_network,
    unit_ablations,
    unit_importance,
    zero_units,
)
from dissect_core.concepts import Concept, ConceptDataset, Sample
from dissect_core.errors import Cancelled, DissectError
from dissect_core.models import LoadedModel

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


@pytest.fixture(scope="module")
def train() -> Colours:
    return Colours(96, 1)


@pytest.fixture(scope="module")
def val() -> Colours:
    return Colours(48, 2)


@pytest.fixture(scope="module")
def importance(train: Colours) -> UnitImportance:
    return unit_importance(hand_model(), train, "units", batch_size=16, device="cpu")


def test_balanced_accuracy_on_hand_arrays() -> None:
    pred = np.array([0, 0, 1, 1, 2, 0])
    labels = np.array([0, 1, 1, 1, 2, 2])
    assert balanced_accuracy(pred, labels, 1) == pytest.approx((2 / 3 + 1) / 2)
    assert balanced_accuracy(pred, labels, 0) == pytest.approx((1 + 3 / 5) / 2)
    assert balanced_accuracy(torch.tensor(pred), torch.tensor(labels), 2) == pytest.approx((1 / 2 + 1) / 2)
    assert np.isnan(balanced_accuracy(pred, labels, 3))
    assert all_class_accuracy(pred, labels) == pytest.approx(4 / 6)
    assert balanced_accuracy(np.array([1, 0, 5]), np.array([1, 0, -1]), 1) == 1.0
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 4).float()
    acc = class_accuracy(logits, labels)
    assert acc.balanced_accuracy.shape == (4,)
    assert acc.accuracy == pytest.approx(4 / 6)
    for c in range(3):
        assert acc.balanced_accuracy[c] == pytest.approx(balanced_accuracy(pred, labels, c))


def test_counts_match_per_class_formulas_and_merge() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 5, generator=gen)
    labels = torch.randint(0, 5, (50,), generator=gen)
    whole = AblationCounts.empty(3, 5)
    whole.add(logits, labels)
    a, b = AblationCounts.empty(3, 5), AblationCounts.empty(3, 5)
    a.add(logits[:, :20], labels[:20])
    b.add(logits[:, 20:], labels[20:])
    merged = AblationCounts.from_state_dict(a.state_dict()).merge(b)
    np.testing.assert_array_equal(merged.correct, whole.correct)
    np.testing.assert_allclose(merged.margin_sum, whole.margin_sum, rtol=1e-12)
    ba = whole.balanced_accuracy()
    assert ba.shape == (3, 5)
    for s in range(3):
        pred = logits[s].argmax(1)
        assert whole.accuracy()[s] == pytest.approx(all_class_accuracy(pred, labels))
        for c in range(5):
            assert ba[s, c] == pytest.approx(balanced_accuracy(pred, labels, c), abs=1e-12)
            own = labels == c
            others = logits[s, own].clone()
            others[:, c] = -np.inf
            margin = (logits[s, own, c] - others.max(1).values).double().mean()
            assert whole.mean_margin()[s, c] == pytest.approx(float(margin), abs=1e-6)


def test_count_ties_and_ranking_on_hand_arrays() -> None:
    ba = np.array([[0.5, 0.9], [0.7, 0.9], [0.7, 0.8], [0.9, 0.9], [0.9, np.nan], [0.9, 0.7], [0.3, 0.6]])
    np.testing.assert_array_equal(count_ties(ba), [5, 3])
    drop = np.array([[0, 0], [0.1, 0.2], [0.3, 0], [0, 0], [0.2, 0], [0, 0], [0, 0.5]], float)
    ranking = rank_units(ba, drop, units=np.arange(10, 17))
    assert ranking.shape == (2, 7)
    np.testing.assert_array_equal(ranking[0], [16, 10, 12, 11, 14, 13, 15])
    np.testing.assert_array_equal(ranking[1], [16, 15, 12, 11, 10, 13, 14])


def test_single_unit_importance_known_answers(importance: UnitImportance) -> None:
    assert importance.balanced_accuracy.shape == (8, 4)
    assert importance.ranking.shape == (4, 8)
    np.testing.assert_array_equal(importance.baseline.balanced_accuracy, [1.0, 1.0, 1.0, 1.0])
    assert importance.baseline.accuracy == 1.0
    for c in range(3):
        a, b = 2 * c, 2 * c + 1
        assert importance.balanced_accuracy[a, c] == 0.5
        assert 0.5 < importance.balanced_accuracy[b, c] < 1.0
        others = [u for u in range(8) if u not in (a, b)]
        np.testing.assert_array_equal(importance.balanced_accuracy[others, c], 1.0)
        assert importance.drop[a, c] == 0.5
    np.testing.assert_array_equal(importance.ranking[0], [0, 1, 6, 2, 3, 4, 5, 7])
    np.testing.assert_array_equal(importance.ranking[1], [2, 3, 0, 1, 4, 5, 6, 7])
    np.testing.assert_array_equal(importance.ranking[2], [4, 5, 0, 1, 2, 3, 6, 7])
    np.testing.assert_array_equal(importance.tied[:3], [6, 6, 6])
    np.testing.assert_array_equal(importance.unchanged[:3], [6, 6, 6])
    assert importance.margin_drop[6, 0] > 0.05
    np.testing.assert_array_equal(importance.margin_drop[[2, 3, 4, 5, 7], 0], 0.0)
    assert importance.classes == CLASSES
    rows = list(importance.rows())
    assert len(rows) == 32 and rows[0] == {**rows[0], "class": "red", "rank": 0, "unit": 0}


def test_batched_ablation_equals_naive_forward_per_unit(train: Colours, importance: UnitImportance) -> None:
    model = hand_model()
    naive = AblationCounts.empty(9, 4)
    logits, labels = class_predictions(model, train, batch_size=32, device="cpu")
    naive._add_rows(logits.unsqueeze(0), labels, 0)
    for u in range(8):
        out, _ = class_predictions(model, train, batch_size=32, device="cpu", edit={"units": zero_units([u])})
        naive._add_rows(out.unsqueeze(0), labels, 1 + u)
    naive._add_images(labels)
    assert logits.shape == (96, 4) and labels.dtype == torch.int64
    batched = UnitImportance.from_counts("units", CLASSES, np.arange(8), naive)
    np.testing.assert_array_equal(batched.balanced_accuracy, importance.balanced_accuracy)
    np.testing.assert_allclose(batched.margin_drop, importance.margin_drop, atol=1e-5)
    np.testing.assert_array_equal(batched.ranking, importance.ranking)

    split = split_network(model, "units", device="cpu")
    assert split.kind == "explicit" and split.shape == (8, 8, 8) and split.num_classes == 4
    x = torch.rand(5, 3, 8, 8)
    a = model.module.units(x)
    for u in (0, 3, 7):
        cut = a.clone()
        cut[:, u] = 0
        from dissect_core.nethook import trace

        with torch.no_grad(), trace(model.module, [], edit={"units": zero_units([u])}) as tr:
            full = tr(x)
            torch.testing.assert_close(split.suffix(cut), full, rtol=0, atol=1e-6)


def test_disk_cache_hook_and_full_paths_agree(train: Colours, importance: UnitImportance, tmp_path) -> None:
    removed = unit_ablations(8)
    model = hand_model()
    disk = ablation_counts(
        model, train, "units", removed, batch_size=10, device="cpu", memory_budget=0, cache_dir=tmp_path, chunk_bytes=1
    )
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(disk.balanced_accuracy()[1:], importance.balanced_accuracy)

    class Wrapper(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    wrapped = hand_model(Wrapper(hand_net()))
    graph = split_network(wrapped, "net.units", device="cpu")
    assert graph.kind == "graph" and graph.plan is not None and graph.plan.direct
    cut = ablation_counts(wrapped, train, "net.units", removed, batch_size=32, device="cpu")
    np.testing.assert_array_equal(cut.correct, disk.correct)

    class Untraceable(Wrapper):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.sum()) > -1e9:  # control flow on a value: torch.fx cannot trace it
                return self.net(x)
            return -self.net(x)

    untraceable = hand_model(Untraceable(hand_net()))
    hook = split_network(untraceable, "net.units", device="cpu")
    assert hook.kind == "hook" and hook.plan is None
    hooked = ablation_counts(untraceable, train, "net.units", removed, batch_size=32, device="cpu")
    np.testing.assert_array_equal(hooked.correct, disk.correct)

    class Skip(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + 0.01 * x.mean((1, 2, 3))[:, None]

    skip = hand_model(Skip(hand_net()))
    assert split_network(skip, "net.units", device="cpu").kind == "full"
    full = ablation_counts(skip, train, "net.units", removed, batch_size=32, device="cpu")
    np.testing.assert_array_equal(full.correct, disk.correct)
    np.testing.assert_allclose(full.margin_sum, disk.margin_sum, atol=1e-4)


def test_unlabelled_images_are_skipped_and_cancel_works() -> None:
    data = Colours(16, 3, unlabelled=5)
    counts = ablation_counts(hand_model(), data, "units", unit_ablations(8, [0]), device="cpu")
    assert counts.n_images == 16 and counts.ablations == 2
    with pytest.raises(Cancelled):
        ablation_counts(hand_model(), data, "units", unit_ablations(8), device="cpu", should_stop=lambda: True)
    with pytest.raises(DissectError):
        ablation_counts(hand_model(), data, "units", torch.zeros(2, 5, dtype=torch.bool), device="cpu")


def test_sets_known_answers(val: Colours, importance: UnitImportance) -> None:
    sets = ablate_sets(hand_model(), val, "units", importance, classes=[0, 1, 2], device="cpu")
    np.testing.assert_array_equal(sets.ks, [1, 2, 3, 4, 5, 8])
    assert sets.removed_top.shape == (3, 6) and sets.kept_top.shape == (3, 6)
    np.testing.assert_array_equal(sets.removed_top[:, :2], 0.5)
    np.testing.assert_array_equal(sets.kept_top[:, 1], 1.0)
    np.testing.assert_array_equal(sets.removed_top[:, -1], 0.5)
    np.testing.assert_array_equal(sets.kept_top[:, -1], 1.0)
    np.testing.assert_allclose(sets.kept_top_accuracy[:, 1], 0.5)
    np.testing.assert_allclose(sets.removed_top_accuracy[:, 1], 0.75)
    summary = sets.summary(20)
    assert summary["k"] == 8 and summary["baseline"] == 1.0 and summary["removed_top"] == 0.5
    assert SetAblation.from_state_dict(sets.state_dict()).rows().__next__() == next(sets.rows())
    table = set_ablations(importance.ranking, 8, [1], [2])
    np.testing.assert_array_equal(
        table.numpy(), [[False] * 8, [False, False, True, True] + [False] * 4, [True, True, False, False] + [True] * 4]
    )


def test_state_dicts_round_trip(importance: UnitImportance) -> None:
    again = UnitImportance.from_state_dict(importance.state_dict())
    np.testing.assert_array_equal(again.ranking, importance.ranking)
    np.testing.assert_array_equal(again.baseline.balanced_accuracy, importance.baseline.balanced_accuracy)
    assert again.layer == "units" and again.classes == CLASSES
    assert isinstance(ClassAccuracy.from_state_dict(importance.baseline.state_dict()), ClassAccuracy)


def test_importance_vs_interpretability(importance: UnitImportance) -> None:
    iou = np.array(
        [[0.1, 0.2], [0.05, 0.0], [0.3, 0.1], [0.0, 0.02], [0.12, 0.0], [0.0, 0.0], [0.01, 0.0], [0.0, 0.03]]
    )
    joined = importance_interpretability(importance, iou, top_k=2, classes=[0, 1, 2])
    np.testing.assert_array_equal(joined.classes_in_top, [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(joined.iou, iou.max(1))
    counts, mean, n = joined.mean_iou_by_count()
    np.testing.assert_array_equal(counts, [0, 1])
    np.testing.assert_allclose(mean, [0.02, (0.2 + 0.05 + 0.3 + 0.02 + 0.12 + 0.0) / 6])
    np.testing.assert_array_equal(n, [2, 6])
    assert joined.correlation() > 0
    again = ImportanceInterpretability.from_state_dict(joined.state_dict())
    np.testing.assert_array_equal(again.classes_in_top, joined.classes_in_top)


def test_explicit_suffix_of_torchvision_resnet_matches_full_network() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    model = LoadedModel(net, "torchvision:resnet18", 4, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert split_network(model, "layer3", device="cpu").kind == "explicit"
    inner = split_network(model, "layer4.0", device="cpu")
    assert inner.kind == "explicit" and inner.shape == (512, 1, 1)
    assert split_network(model, "layer4.0.conv1", device="cpu").kind == "full"
    data = Colours(12, 4)
    removed = unit_ablations(256, [0, 5, 17])
    fast = ablation_counts(model, data, "layer3", removed, device="cpu")
    slow_split = split_network(model, "layer3", device="cpu")
    slow_split.kind, slow_split.suffix = "full", None
    slow = ablation_counts(model, data, "layer3", removed, device="cpu", split=slow_split)
    np.testing.assert_array_equal(fast.correct, slow.correct)
    np.testing.assert_array_equal(fast.predicted, slow.predicted)
    np.testing.assert_allclose(fast.margin_sum, slow.margin_sum, atol=1e-4)


def test_cli_ablate_writes_tables(tmp_path) -> None:
    import csv
    import json

    from safetensors.torch import save_file

    from dissect_core.__main__ import main
    from dissect_core.archs import ARCHS

    torch.manual_seed(0)
    net = ARCHS["scenecnn"](6)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    code = main(
        [
            "ablate",
            "--model",
            "builtin:scenecnn",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--input-size",
            "32",
            "--dataset",
            "synthetic:40",
            "--layer",
            "conv5",
            "--ks",
            "1,20",
            "--attack-images",
            "3",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    with open(out / "conv5" / "importance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class", "class_index", "rank", "unit", "balanced_accuracy", "drop", "margin_drop"]
    assert len(rows) == 6 * 128
    report = json.loads((out / "conv5" / "ablation.json").read_text())
    assert report["headline"]["k"] == 20 and report["units"] == 128 and "attack" in report
    arrays = np.load(out / "conv5" / "ablation.npz")
    assert arrays["importance.balanced_accuracy"].shape == (128, 6)
    assert (
        main(
            [
                "ablate",
                "--model",
                "builtin:scenecnn",
                "--weights",
                str(tmp_path / "w.safetensors"),
                "--input-size",
                "32",
                "--dataset",
                "synthetic:8",
                "--layer",
                "conv5",
                "--ks",
                "x",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 2
    )

"""The engine on a GPU: the CPU tests' known answers, CPU == CUDA, and host syncs per batch
rather than per image. Skipped where torch sees no CUDA device; ``scripts/device_check.sh``
runs them (and the CUDA benchmark) on a machine that has one."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_dissect import RectDataset, copy_model
from test_dissect_skip import Blocks, net, reference

from dissect_core.dissect import dissect

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: scripts/device_check.sh")


@pytest.mark.parametrize("layer", ["units", "coarse"])
@pytest.mark.parametrize("q", [0.99, 0.8, 0.6])
def test_known_answers_on_cuda(layer: str, q: float) -> None:
    model, ds = net(), Blocks()
    ref = reference(ds, layer, q)
    res = dissect(model, ds, [layer], quantile=q, batch_size=7, device="cuda")[layer]
    np.testing.assert_array_equal(res.thresholds, ref["t"])
    np.testing.assert_array_equal(res.intersection, ref["inter"])
    np.testing.assert_array_equal(res.act_area, ref["act"])


def test_cuda_equals_cpu() -> None:
    model, ds = copy_model(), RectDataset(n=23)
    layers = ["coarse", "units"]
    results = [
        dissect(model, ds, layers, quantile=0.95, batch_size=4, device=d, top_k_images=3) for d in ("cpu", "cuda")
    ]
    for layer in layers:
        cpu, gpu = (r[layer] for r in results)
        for name in ("thresholds", "intersection", "act_area", "concept_area", "iou", "top_images"):
            np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name), err_msg=f"{layer}.{name}")


def _syncs(n: int) -> int:
    """Host synchronisations while dissecting n images in one batch."""
    ds = Blocks(n=n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            dissect(net(), ds, ["coarse"], quantile=0.9, batch_size=n, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def test_host_syncs_grow_with_batches_not_images() -> None:
    few, many = _syncs(16), _syncs(128)
    print(f"host syncs: 16 images {few}, 128 images {many} (one batch each)")
    assert few > 0
    assert many < 2 * few + 8


def test_rank_one_ablation_on_cuda_equals_cpu() -> None:
    torchvision = pytest.importorskip("torchvision")
    from test_rankone import Noise

    from dissect_core.ablation import ablation_counts, split_network, unit_ablations
    from dissect_core.models import LoadedModel

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    model = LoadedModel(net, "torchvision:resnet18", 5, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ds = Noise(12, 64, 5)
    units = [0, 7, 100, 255]
    counts = {}
    for device in ("cpu", "cuda"):
        split = split_network(model, "layer3", device=device)
        assert split.plan is not None
        counts[device] = ablation_counts(
            model, ds, "layer3", unit_ablations(256, units), batch_size=5, device=device, split=split
        )
    np.testing.assert_array_equal(counts["cuda"].correct, counts["cpu"].correct)
    np.testing.assert_array_equal(counts["cuda"].predicted, counts["cpu"].predicted)
    np.testing.assert_allclose(counts["cuda"].margin_sum, counts["cpu"].margin_sum, rtol=1e-3, atol=1e-3)

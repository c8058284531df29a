"""Benchmark of the single-unit ablation sweep against one bare forward pass (issue #20's targets).

For each case, a torchvision classifier with random weights (6 classes) at the given input
size and the training split of synthetic scenes (generated once, 112 px):

- forward: one bare forward pass over the same images, decoded in memory beforehand
  (preprocessing included, best of 3);
- sweep: ``unit_importance`` on the layer, every unit removed alone (decoding, the cached
  prefix and the ablations, best of 2);
- the ratio sweep / forward, against the target.

Then the whole ablate job on the fixture-sized case (shufflenet_v2_x1_0 at 112 px,
``stage4``, the train and val splits): what a worker runs (load the model and the data,
the sweep on train, the set ablations on val), against one bare forward pass over the
images of both splits. ``--compare`` also times each sweep without its rank-one plan
(every ablation through the layer's suffix, the previous engine).

Usage: python bench/bench_ablation_sweep.py [--images 300] [--only shufflenet,resnet18]
       [--compare] [--data var/bench/scenes112-300]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    ("shufflenet_v2_x1_0", "stage4", 112, 10.0),
    ("resnet18", "layer4", 112, 10.0),
    ("resnet18", "layer4", 224, 10.0),
    ("resnet18", "layer3", 112, 40.0),
    ("resnet18", "layer3", 224, 40.0),
]
JOB_TARGET = 20.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300, help="scenes generated (train and val together)")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--only", default=None, help="comma-separated architectures to run")
    parser.add_argument("--compare", action="store_true", help="also time each sweep without its rank-one plan")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import torch

    from dissect_core.ablation import ablate_sets, split_network, unit_importance
    from dissect_core.broden import BrodenDataset
    from dissect_core.dissect import preprocess_images
    from dissect_core.models import load_model
    from dissect_core.synthetic import generate

    data = args.data or ROOT / f"var/bench/scenes112-{args.images}"
    if not (data / "index.csv").exists():
        generate(data, n_images=args.images, seed=3, image_size=(112, 112))
    train = BrodenDataset(data, split="train")
    val = BrodenDataset(data, split="val")

    def decoded(dataset: BrodenDataset) -> torch.Tensor:
        return torch.stack([torch.from_numpy(dataset[i].image).permute(2, 0, 1) for i in range(len(dataset))])

    def forward_seconds(model, images: torch.Tensor) -> float:
        best = float("inf")
        with torch.no_grad():
            for _ in range(3):
                t = time.perf_counter()
                for s in range(0, len(images), args.batch_size):
                    x = preprocess_images(images[s : s + args.batch_size], model.input_size, model.mean, model.std)
                    model.module(x)
                best = min(best, time.perf_counter() - t)
        return best

    def build(arch: str, size: int):
        torch.manual_seed(0)
        return load_model(f"torchvision:{arch}", None, 6, input_size=size)

    only = set(args.only.split(",")) if args.only else None
    train_images = decoded(train)
    print(
        f"{len(train)} train / {len(val)} val synthetic scenes ({data}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, batch {args.batch_size}"
    )
    header = (
        f"{'network':<20}{'layer':<8}{'px':>5}{'units':>7}{'forward s':>11}{'sweep s':>10}{'ratio':>8}{'target':>8}"
    )
    if args.compare:
        header += f"{'no plan s':>11}{'ratio':>8}"
    print()
    print("single-unit sweep on the training split (every unit removed alone)")
    print(header)
    for arch, layer, size, target in CASES:
        if only and arch not in only:
            continue
        model = build(arch, size)
        forward = forward_seconds(model, train_images)
        sweep = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            unit_importance(model, train, layer, batch_size=args.batch_size)
            sweep = min(sweep, time.perf_counter() - t)
        split = split_network(model, layer)
        line = (
            f"{arch:<20}{layer:<8}{size:>5}{split.units:>7}{forward:>11.2f}{sweep:>10.2f}"
            f"{sweep / forward:>7.1f}x{target:>7.0f}x"
        )
        if split.plan is None:
            line += "  (no rank-one plan)"
        if args.compare:
            split.plan = None
            t = time.perf_counter()
            unit_importance(model, train, layer, batch_size=args.batch_size, split=split)
            slow = time.perf_counter() - t
            line += f"{slow:>11.2f}{slow / forward:>7.1f}x"
        print(line, flush=True)

    if only and "shufflenet_v2_x1_0" not in only:
        return 0
    arch, layer, size = "shufflenet_v2_x1_0", "stage4", 112
    model = build(arch, size)
    forward = forward_seconds(model, torch.cat([train_images, decoded(val)]))
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        job_model = build(arch, size)
        job_train = BrodenDataset(data, split="train")
        job_val = BrodenDataset(data, split="val")
        importance = unit_importance(job_model, job_train, layer, batch_size=args.batch_size)
        sets = ablate_sets(job_model, job_val, layer, importance, batch_size=args.batch_size)
        best = min(best, time.perf_counter() - t)
    print()
    print(
        f"the whole ablate job ({arch} at {size} px, {layer}: load, sweep on {len(train)} train images, "
        f"{1 + 2 * sets.removed_top.size} set ablations on {len(val)} val images)"
    )
    print(f"{'forward s (train + val)':>24}{'job s':>9}{'ratio':>8}{'target':>8}")
    print(f"{forward:>24.2f}{best:>9.2f}{best / forward:>7.1f}x{JOB_TARGET:>7.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

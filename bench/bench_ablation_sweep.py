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

On a GPU (``--device cuda``) the forward pass and the sweep both run there (timed to a
device synchronisation), the images decoded on the host as a worker does.

Usage: python bench/bench_ablation_sweep.py [--images 300] [--only shufflenet,resnet18]
       [--compare] [--data var/bench/scenes112-300] [--device cpu]
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
    parser.add_argument("--device", default="cpu")
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

    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward_seconds(model, images: torch.Tensor) -> float:
        best = float("inf")
        module = model.module.to(device)
        with torch.no_grad():
            for _ in range(3):
                sync()
                t = time.perf_counter()
                for s in range(0, len(images), args.batch_size):
                    batch = images[s : s + args.batch_size].to(device, non_blocking=True)
                    module(preprocess_images(batch, model.input_size, model.mean, model.std))
                sync()
                best = min(best, time.perf_counter() - t)
        return best

    def timed(fn, *fn_args, **fn_kwargs):
        """(seconds, result) of one call, timed to a device synchronisation."""
        sync()
        t = time.perf_counter()
        result = fn(*fn_args, **fn_kwargs)
        sync()
        return time.perf_counter() - t, result

    def build(arch: str, size: int):
        torch.manual_seed(0)
        return load_model(f"torchvision:{arch}", None, 6, input_size=size)

    only = set(args.only.split(",")) if args.only else None
    start = time.perf_counter()
    train_images = decoded(train)
    decode_s = time.perf_counter() - start  # what each sweep reads on the host too
    print(
        f"{len(train)} train / {len(val)} val synthetic scenes ({data}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, batch {args.batch_size}, device {device}; "
        f"decoding the train split alone {decode_s:.2f} s"
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
        sweep = min(
            timed(unit_importance, model, train, layer, batch_size=args.batch_size, device=device)[0] for _ in range(2)
        )
        split = split_network(model, layer, device=device)
        line = (
            f"{arch:<20}{layer:<8}{size:>5}{split.units:>7}{forward:>11.2f}{sweep:>10.2f}"
            f"{sweep / forward:>7.1f}x{target:>7.0f}x"
        )
        if split.plan is None:
            line += "  (no rank-one plan)"
        if args.compare:
            split.plan = None
            slow, _ = timed(
                unit_importance, model, train, layer, batch_size=args.batch_size, split=split, device=device
            )
            line += f"{slow:>11.2f}{slow / forward:>7.1f}x"
        print(line, flush=True)

    if only and "shufflenet_v2_x1_0" not in only:
        return 0
    arch, layer, size = "shufflenet_v2_x1_0", "stage4", 112
    model = build(arch, size)
    forward = forward_seconds(model, torch.cat([train_images, decoded(val)]))

    def job():
        job_model = build(arch, size)
        job_train = BrodenDataset(data, split="train")
        job_val = BrodenDataset(data, split="val")
        importance = unit_importance(job_model, job_train, layer, batch_size=args.batch_size, device=device)
        return ablate_sets(job_model, job_val, layer, importance, batch_size=args.batch_size, device=device)

    runs = [timed(job) for _ in range(2)]
    best = min(seconds for seconds, _ in runs)
    sets = runs[0][1]
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

"""Benchmark of dissect_core.dissect on a vision transformer: timm ViT-S/16 (random weights, seed 0),
a block's output (384 units on the 14 x 14 patch grid, class token left out) and its MLP hidden
layer (1,536 units), on synthetic scenes at 224 px with 112 px masks.

Prints a table: for each layer, dissection time against a bare forward pass over the same
in-memory images (same batch size and preprocessing; target < 1.5x on CPU, as for CNNs), the time
per phase, and the peak RSS of a dissection in a fresh process at 1x and 4x the images (scenes
rendered on the fly, so the dataset itself holds no memory; target: flat).

Usage: python bench/bench_dissect_vit.py [--images 500] [--rss-images 100] [--batch-size 32] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_dissect import _bare_forward, phase_summary, print_table, timed_dissect  # noqa: E402
from bench_dissect_large import _InMemory  # noqa: E402

ARCH = "timm:vit_small_patch16_224"
LAYERS = {"block": "blocks.6", "mlp hidden": "blocks.6.mlp.act"}


def _model():
    import torch

    from dissect_core.models import load_model

    torch.manual_seed(0)
    return load_model(ARCH, num_classes=10, input_size=224)


def _child(args: argparse.Namespace) -> None:
    from dissect_core.dissect import dissect
    from dissect_core.synthetic import SyntheticScenes

    dataset = SyntheticScenes(args.images, seed=0, image_size=(224, 224))
    model = _model()
    start = time.perf_counter()
    dissect(model, dataset, [args.layer], batch_size=args.batch_size, device="cpu")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _rss(layer: str, images: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--layer", layer, "--images", str(images)]
    cmd += ["--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rss-images", type=int, default=100, help="images of the 1x memory run (4x: four times)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layer", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    memory = {
        name: (_rss(layer, args.rss_images, args), _rss(layer, 4 * args.rss_images, args))
        for name, layer in LAYERS.items()
    }

    import torch

    from dissect_core.dissect import dissect
    from dissect_core.models import layer_layouts

    dataset = _InMemory(args.images)
    model = _model()
    layouts = layer_layouts(model, list(LAYERS.values()))
    dissect(
        model,
        dataset,
        list(LAYERS.values()),
        batch_size=args.batch_size,
        device="cpu",
        indices=list(range(args.batch_size)),
    )
    forward_s: list[float] = []
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in LAYERS}
    for _ in range(args.repeat):
        start = time.perf_counter()
        _bare_forward(model, dataset, range(len(dataset)), args.batch_size, "cpu")
        forward_s.append(time.perf_counter() - start)
        for name, layer in LAYERS.items():
            runs[name].append(timed_dissect(model, dataset, [layer], args.batch_size, "cpu"))
    fwd = min(forward_s)
    print(
        f"model:   {ARCH} (random weights, seed 0); "
        + "; ".join(
            f"{name} {layer}: {layouts[layer].units} units, {layouts[layer].describe()}"
            for name, layer in LAYERS.items()
        )
    )
    print(
        f"data:    {args.images} synthetic scenes at 224 px in memory, masks {dataset.mask_size[0]} px, "
        f"{len(dataset.concepts)} concepts"
    )
    print(
        f"machine: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {args.batch_size}; "
        f"best of {args.repeat}"
    )
    rows = [("metric", "value", "target"), ("bare forward, s", f"{fwd:.2f}", "")]
    for name, layer in LAYERS.items():
        dis, phases = min(runs[name], key=lambda run: run[0])
        one, four = memory[name]
        rows += [
            (f"{name} ({layer}): dissection, s", f"{dis:.2f}", ""),
            (f"{name}: dissection / forward", f"{dis / fwd:.2f}x", "< 1.5x"),
            (f"{name}:   phases: forward+sketch / count / other, s", phase_summary(phases), ""),
            (
                f"{name}: peak RSS, {args.rss_images} / {4 * args.rss_images} images",
                f"{one['rss_mb']:.0f} / {four['rss_mb']:.0f} MB",
                "flat",
            ),
        ]
    print_table(rows)


if __name__ == "__main__":
    main()

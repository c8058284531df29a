"""Benchmark of dissect_core.dissect at Broden-like sizes: resnet18 layer3 + layer4 on 224 px
images with 112 px masks (8x and 16x upsampling, 768 units).

Prints a table: dissection time against a bare forward pass over the same in-memory
images (same batch size and preprocessing), the time per phase, and the peak RSS of a
dissection in a fresh process. The network has random weights (seed 0): nothing can be
downloaded here, and the work per pixel does not depend on what the weights learnt.

Usage: python bench/bench_dissect_large.py [--images 192] [--batch-size 32] [--repeat 2]
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

LAYERS = ["layer3", "layer4"]


class _InMemory:
    """Synthetic scenes rendered once, served from memory (no decoding in either timing)."""

    def __init__(self, n: int) -> None:
        from dissect_core.synthetic import SyntheticScenes

        scenes = SyntheticScenes(n, seed=0, image_size=(224, 224))
        self.concepts = scenes.concepts
        self.mask_size = scenes.mask_size
        self.samples = [scenes[i] for i in range(n)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


def _model():
    import torch

    from dissect_core.models import load_model

    torch.manual_seed(0)
    return load_model("torchvision:resnet18", num_classes=10, input_size=224)


def _child(args: argparse.Namespace) -> None:
    from dissect_core.dissect import dissect

    dataset = _InMemory(args.images)
    model = _model()
    start = time.perf_counter()
    dissect(model, dataset, LAYERS, batch_size=args.batch_size, device="cpu")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    cmd = [sys.executable, __file__, "--child", "--images", str(args.images), "--batch-size", str(args.batch_size)]
    child = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])

    import torch

    from dissect_core.dissect import dissect

    dataset = _InMemory(args.images)
    model = _model()
    dissect(model, dataset, LAYERS, batch_size=args.batch_size, device="cpu", indices=list(range(args.batch_size)))
    forward_s, runs = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        _bare_forward(model, dataset, range(len(dataset)), args.batch_size, "cpu")
        forward_s.append(time.perf_counter() - start)
        runs.append(timed_dissect(model, dataset, LAYERS, args.batch_size, "cpu"))
    fwd = min(forward_s)
    dis, phases = min(runs, key=lambda run: run[0])
    print(f"model:   torchvision:resnet18 (random weights, seed 0), layers {' + '.join(LAYERS)} (256x14x14, 512x7x7)")
    print(
        f"data:    {args.images} synthetic scenes at 224 px in memory, masks {dataset.mask_size[0]} px, "
        f"{len(dataset.concepts)} concepts"
    )
    print(
        f"machine: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {args.batch_size}; "
        f"best of {args.repeat}"
    )
    rows = [
        ("metric", "value"),
        ("bare forward, s", f"{fwd:.2f}"),
        ("dissection, s", f"{dis:.2f}"),
        ("dissection / forward", f"{dis / fwd:.2f}x"),
        ("  phases: forward+sketch / count / other, s", phase_summary(phases)),
        ("dissection in a fresh process: s / peak RSS MB", f"{child['seconds']:.2f} / {child['rss_mb']:.0f}"),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()

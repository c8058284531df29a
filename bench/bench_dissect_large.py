"""Benchmark of dissect_core.dissect at Broden-like sizes: resnet18 layer3 + layer4 on 224 px
images with 112 px masks (8x and 16x upsampling, 768 units).

Prints a table per layer set: dissection time against a bare forward pass over the same
in-memory images (same batch size and preprocessing), images per second, the time per
phase, and (on the CPU) the peak RSS of a dissection in a fresh process, or (on a GPU) the
peak device memory. The network has random weights (seed 0): nothing can be downloaded
here, and the work per pixel does not depend on what the weights learnt.

Usage: python bench/bench_dissect_large.py [--images 192] [--batch-size 32] [--repeat 2]
       [--device cpu] [--layers layer3,layer4 [--layers layer4 ...]] [--workers N]

``--layers`` may be given several times: one table per layer set, over the same images
(the GPU rows: ``--device cuda --images 10000 --batch-size 128 --layers layer4 --layers
layer3``). ``--workers`` renders the scenes in that many processes (default: one per CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_dissect import _bare_forward, phase_summary, print_table, timed_dissect  # noqa: E402

DEFAULT_LAYERS = "layer3,layer4"
SHAPES = {"layer1": "64x56x56", "layer2": "128x28x28", "layer3": "256x14x14", "layer4": "512x7x7"}


def _render(span: tuple[int, int]) -> list:
    from dissect_core.synthetic import SyntheticScenes

    scenes = SyntheticScenes(span[1], seed=0, image_size=(224, 224))
    return [scenes[i] for i in range(*span)]


class _InMemory:
    """Synthetic scenes rendered once (in ``workers`` processes), served from memory (no
    decoding in either timing). Scene i is the same whatever the number of workers."""

    def __init__(self, n: int, workers: int = 1) -> None:
        from dissect_core.synthetic import SyntheticScenes

        scenes = SyntheticScenes(n, seed=0, image_size=(224, 224))
        self.concepts = scenes.concepts
        self.mask_size = scenes.mask_size
        if workers <= 1 or n < 64:
            self.samples = [scenes[i] for i in range(n)]
            return
        import multiprocessing

        step = -(-n // (4 * workers))
        spans = [(s, min(n, s + step)) for s in range(0, n, step)]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            self.samples = [sample for part in pool.map(_render, spans) for sample in part]

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
    dissect(model, dataset, args.layers[0].split(","), batch_size=args.batch_size, device="cpu")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def warm_up(model, dataset, layers: list[str], batch_size: int, device: str) -> None:
    """One dissection of one batch: the plans, kernels and (on a GPU) the allocator, before timing."""
    from dissect_core.dissect import dissect

    indices = list(range(min(batch_size, len(dataset))))
    dissect(model, dataset, layers, batch_size=batch_size, device=device, indices=indices)


def _table(args: argparse.Namespace, model, dataset, layers: list[str], child: dict | None) -> None:
    import torch

    cuda = torch.device(args.device).type == "cuda"
    warm_up(model, dataset, layers, args.batch_size, args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    forward_s, runs = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        _bare_forward(model, dataset, range(len(dataset)), args.batch_size, args.device)
        forward_s.append(time.perf_counter() - start)
        runs.append(timed_dissect(model, dataset, layers, args.batch_size, args.device))
    fwd = min(forward_s)
    dis, phases = min(runs, key=lambda run: run[0])
    n = len(dataset)
    shapes = ", ".join(SHAPES.get(name, "?") for name in layers)
    print()
    print(f"model:   torchvision:resnet18 (random weights, seed 0), layers {' + '.join(layers)} ({shapes})")
    print(
        f"data:    {n} synthetic scenes at 224 px in memory, masks {dataset.mask_size[0]} px, {len(dataset.concepts)} concepts"
    )
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"machine: {where}, torch {torch.__version__}; batch {args.batch_size}; best of {args.repeat}")
    rows = [
        ("metric", "value"),
        ("bare forward, s", f"{fwd:.2f}"),
        ("bare forward, images/s", f"{n / fwd:.0f}"),
        ("dissection, s", f"{dis:.2f}"),
        ("dissection, images/s", f"{n / dis:.0f}"),
        ("dissection / forward", f"{dis / fwd:.2f}x"),
        ("  phases: forward+sketch / count / other, s", phase_summary(phases)),
    ]
    if child is not None:
        rows.append(
            ("dissection in a fresh process: s / peak RSS MB", f"{child['seconds']:.2f} / {child['rss_mb']:.0f}")
        )
    if cuda:
        rows.append(("peak GPU memory allocated, MB", f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"))
    print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", action="append", default=None, help=f"comma-separated (default {DEFAULT_LAYERS})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering the scenes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.layers = args.layers or [DEFAULT_LAYERS]
    if args.child:
        _child(args)
        return

    child = None
    if args.device == "cpu":  # peak RSS of the first layer set, in a fresh process
        cmd = [sys.executable, __file__, "--child", "--images", str(args.images), "--batch-size", str(args.batch_size)]
        cmd += ["--layers", args.layers[0]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        child = json.loads(out.strip().splitlines()[-1])

    start = time.perf_counter()
    dataset = _InMemory(args.images, args.workers)
    print(
        f"rendered {args.images} scenes in {time.perf_counter() - start:.1f} s ({args.workers} processes)", flush=True
    )
    model = _model()
    for i, layers in enumerate(args.layers):
        _table(args, model, dataset, layers.split(","), child if i == 0 else None)
        sys.stdout.flush()


if __name__ == "__main__":
    main()

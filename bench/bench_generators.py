"""Timings of the generator experiments on a 64x64 DCGAN (random weights; timing does not depend on them).

Prints: paint latency (median and max over --paints calls, model loaded, after the
first call), insertion-map time at every position of a layer for --samples
samples, and a removal curve's time.

Usage: python bench/bench_generators.py [--layer layer3] [--samples 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dcgan(latent_dim: int):
    """gan.build_generator("dcgan") when dissect_core.gan exists, else the standard DCGAN layout."""
    from torch import nn

    try:
        from dissect_core.gan import build_generator

        return build_generator("dcgan", latent_dim=latent_dim), "dissect_core.gan dcgan"
    except ImportError:
        pass

    def up(i: int, o: int, first: bool = False) -> nn.Sequential:
        return nn.Sequential(
            nn.ConvTranspose2d(i, o, 4, 1 if first else 2, 0 if first else 1, bias=False),
            nn.BatchNorm2d(o),
            nn.ReLU(True),
        )

    class DCGAN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = up(latent_dim, 512, first=True)
            self.layer2 = up(512, 256)
            self.layer3 = up(256, 128)
            self.layer4 = up(128, 64)
            self.output = nn.Sequential(nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False), nn.Tanh())

        def forward(self, z):
            x = self.layer1(z.view(z.shape[0], -1, 1, 1))
            return self.output(self.layer4(self.layer3(self.layer2(x))))

    return DCGAN(), "standard DCGAN replica (ngf=64)"


def main() -> None:
    import numpy as np
    import torch

    from dissect_core.generators import (
        _split,
        insertion_map,
        paint,
        removal_curve,
        wrap_generator,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="layer3")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--removal-samples", type=int, default=256)
    ap.add_argument("--paints", type=int, default=20)
    ap.add_argument("--latent-dim", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    module, what = _dcgan(args.latent_dim)
    gen = wrap_generator(module, args.latent_dim)
    split = _split(gen, args.layer, torch.device(args.device))
    units = list(range(20))
    print(
        f"{what}; {gen.input_size[0]}x{gen.input_size[1]} images; {torch.get_num_threads()} threads; "
        f"layer {args.layer} {split.shape}, run from the layer as {split.mode!r}"
    )
    mask = np.zeros(gen.input_size, bool)
    mask[20:40, 10:30] = True
    t0 = time.perf_counter()
    paint(gen, args.layer, units, seed=0, mask=mask, device=args.device)
    print(f"paint, first call (finds the 0.995 quantiles over 256 samples): {time.perf_counter() - t0:.2f} s")
    times = []
    for i in range(args.paints):
        t0 = time.perf_counter()
        paint(gen, args.layer, units, seed=0, index=i, mask=mask, device=args.device)
        times.append(time.perf_counter() - t0)
    print(
        f"paint: median {1000 * statistics.median(times):.1f} ms, max {1000 * max(times):.1f} ms "
        f"over {args.paints} calls"
    )
    t0 = time.perf_counter()
    result = insertion_map(gen, "colors", args.layer, units, 9, count=args.samples, device=args.device)
    dt = time.perf_counter() - t0
    rows = int(result.tested.sum()) * args.samples
    print(
        f"insertion map: {result.grid[0]}x{result.grid[1]} positions x {args.samples} samples = {rows} edited "
        f"images in {dt:.1f} s ({rows / dt:.0f} images/s)"
    )
    t0 = time.perf_counter()
    curve = removal_curve(gen, "colors", args.layer, units, 9, count=args.removal_samples, device=args.device)
    dt = time.perf_counter() - t0
    print(f"removal curve: ks {curve.ks} x {args.removal_samples} samples in {dt:.1f} s")


if __name__ == "__main__":
    main()

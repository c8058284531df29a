"""Benchmark of the label evidence (dissect_core.evidence): what it adds to a dissection.

Prints a table: for the demo classifier (``conv5`` on the Broden-format synthetic data,
as bench/bench_dissect.py) and for resnet18 ``layer3`` + ``layer4`` at Broden-like sizes
(224 px images, 112 px masks, as bench/bench_dissect_large.py), the dissection with the
evidence (the default: 16 blocks, 1000 resamples) against the same dissection without it
(``evidence_blocks=1``), alternated, best of ``--repeat``; the peak RSS of a dissection
with evidence at 1x and 4x the images (fresh processes); and the evidence alone on
Broden-sized tallies (512 units x 1,198 concepts, 16 blocks) shaped like a real layer's
(a few labels well above chance, concepts of Zipf-like areas at chance).

Usage: python bench/bench_evidence.py [--images 500] [--large-images 192] [--repeat 3]
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_dissect import _setup, print_table  # noqa: E402


def _dissect_seconds(model, dataset, layers, indices, blocks: int, batch_size: int) -> float:
    from dissect_core.dissect import dissect

    start = time.perf_counter()
    dissect(model, dataset, layers, batch_size=batch_size, indices=indices, evidence_blocks=blocks)
    return time.perf_counter() - start


def _pair(model, dataset, layers, indices, repeat: int, batch_size: int) -> tuple[float, float]:
    """Best of ``repeat`` (without, with) evidence, alternated."""
    _dissect_seconds(model, dataset, layers, indices[:batch_size], 16, batch_size)  # warm up
    without, with_ = [], []
    for _ in range(repeat):
        without.append(_dissect_seconds(model, dataset, layers, indices, 1, batch_size))
        with_.append(_dissect_seconds(model, dataset, layers, indices, 16, batch_size))
    return min(without), min(with_)


def _broden_tallies(seed: int = 0) -> tuple[np.ndarray, ...]:
    """Block tallies shaped like a 512-unit layer on Broden: 16 blocks of 3,950 images with
    112 x 112 masks; concept areas Zipf-like; each unit on 1% of pixels, its label at 5x
    chance, three more concepts at 2x, the rest at chance."""
    rng = np.random.default_rng(seed)
    m, units, concepts, cells = 16, 512, 1198, 64
    images = np.full(m, 3950)
    pixels = images[:, None] * (112 * 112)
    share = 0.3 / np.arange(1, concepts + 1) ** 1.1
    con = rng.poisson(pixels * share[None, :]).astype(np.int64)  # [m, C]
    act = rng.poisson(np.full((m, units), 0.01) * pixels).astype(np.int64)  # [m, U]
    lift = np.ones((units, concepts))
    lift[np.arange(units), rng.integers(0, 300, units)] = 5.0
    for _ in range(3):
        lift[np.arange(units), rng.integers(0, concepts, units)] = 2.0
    p = np.minimum(share[None, :] * lift, 1.0)
    inter = rng.binomial(act[:, :, None], p[None])  # [m, U, C]
    act_cells = rng.multinomial(1, np.full(cells, 1 / cells), size=(m, units)) * act[:, :, None]
    con_cells = np.repeat(con[:, :, None], cells, axis=2) // cells
    return inter, act_cells, con_cells, images, np.full(cells, 112 * 112 // cells)


def _child(args: argparse.Namespace) -> None:
    model, dataset, _ = _setup(Path(args.demo), 4 * args.images)
    _dissect_seconds(model, dataset, ["conv5"], list(range(args.images)), 16, 32)
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _rss(images: int, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--child", "--images", str(images), "--demo", args.demo]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--large-images", type=int, default=192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--demo", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "dissect-bench-demo"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    _setup(Path(args.demo), 4 * args.images)  # build the demo once, outside the timings
    rss1, rss4 = _rss(args.images, args), _rss(4 * args.images, args)

    import torch
    from bench_dissect_large import LAYERS, _InMemory, _model

    from dissect_core.evidence import label_evidence

    model, dataset, what = _setup(Path(args.demo), 4 * args.images)
    demo = _pair(model, dataset, ["conv5"], list(range(args.images)), args.repeat, 32)
    large_data = _InMemory(args.large_images)
    large = _pair(_model(), large_data, LAYERS, list(range(args.large_images)), args.repeat, 32)
    tallies = _broden_tallies()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        ev = label_evidence(*tallies)
        times.append(time.perf_counter() - start)

    print(f"demo:    {what}; conv5; {args.images} images, {len(dataset.concepts)} concepts")
    print(
        f"large:   torchvision:resnet18 (random weights) {' + '.join(LAYERS)}; {args.large_images} synthetic scenes "
        f"at 224 px, masks {large_data.mask_size[0]} px, {len(large_data.concepts)} concepts"
    )
    print(f"machine: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; best of {args.repeat}")
    rows = [
        ("metric", "value"),
        ("demo: dissection without evidence, s", f"{demo[0]:.2f}"),
        ("demo: dissection with evidence, s", f"{demo[1]:.2f}"),
        ("demo: with / without", f"{demo[1] / demo[0]:.3f}x"),
        ("large: dissection without evidence, s", f"{large[0]:.2f}"),
        ("large: dissection with evidence, s", f"{large[1]:.2f}"),
        ("large: with / without", f"{large[1] / large[0]:.3f}x"),
        (f"demo with evidence, peak RSS MB: {args.images} / {4 * args.images} images", f"{rss1:.0f} / {rss4:.0f}"),
        ("evidence alone, 512 units x 1198 concepts, s", f"{min(times):.2f}"),
        ("  concepts reaching the label in a resample, per unit", f"{float(np.mean(ev.contenders)):.1f}"),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()

"""Do stable labels hold on other images? The demo classifier dissected on each half of its scenes.

Dissects the demo classifier's conv layers on all of the demo's synthetic scenes, then on the
even-indexed and the odd-indexed scenes separately (each half with its own evidence). Prints
per layer: units; units whose label (on all scenes) has stability >= 0.9, and the share of
those whose two half-dissections give the same label; the same share for the other units;
and the detector count the paper uses (IoU >= 0.04) against the count at p < 0.01 (and the
detectors that pass both).

Usage: python bench/demo_label_evidence.py [--demo var/data/demo] [--layers conv3,conv4,conv5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_dissect import _setup  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "var/data/demo")
    parser.add_argument("--layers", default="conv3,conv4,conv5")
    parser.add_argument("--min-stability", type=float, default=0.9)
    args = parser.parse_args()

    import numpy as np
    import torch

    from dissect_core.dissect import dissect

    model, dataset, what = _setup(args.demo, 3000)
    layers = args.layers.split(",")
    n = len(dataset)
    start = time.monotonic()
    full = dissect(model, dataset, layers, top_k_images=0)
    halves = [dissect(model, dataset, layers, top_k_images=0, indices=list(range(k, n, 2))) for k in (0, 1)]
    print(
        f"{what}; {n} scenes ({len(dataset.concepts)} concepts); halves: "
        f"even / odd indices; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{time.monotonic() - start:.0f} s"
    )
    head = (
        f"{'layer':<7} {'units':>5} {'stable':>7} {'agree':>7} {'others':>7} {'agree':>7} "
        f"{'IoU>=.04':>9} {'p<.01':>6} {'both':>5}"
    )
    print(head)
    print("-" * len(head))
    totals = np.zeros(2, np.int64)
    for layer in layers:
        ev = full[layer].evidence
        assert ev is not None
        labels = [np.asarray([lab.number for lab in half[layer].labels]) for half in halves]
        agree = labels[0] == labels[1]
        labelled = ev.label >= 0
        stable = labelled & (np.nan_to_num(ev.stability) >= args.min_stability)
        others = labelled & ~stable
        detectors = labelled & (np.nan_to_num(ev.iou) >= 0.04)
        significant = labelled & (np.nan_to_num(ev.p_value, nan=1.0) < 0.01)
        totals += [int(stable.sum()), int((agree & stable).sum())]

        def share(mask: np.ndarray, agree: np.ndarray = agree) -> str:
            return f"{agree[mask].mean():.1%}" if mask.any() else "-"

        print(
            f"{layer:<7} {full[layer].units:>5} {int(stable.sum()):>7} {share(stable):>7} {int(others.sum()):>7} "
            f"{share(others):>7} {int(detectors.sum()):>9} {int(significant.sum()):>6} "
            f"{int((detectors & significant).sum()):>5}"
        )
    if totals[0]:
        print(
            f"all layers: {totals[1]} of {totals[0]} labels with stability >= {args.min_stability} agree on both "
            f"halves ({totals[1] / totals[0]:.1%})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

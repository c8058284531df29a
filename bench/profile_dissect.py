"""Where a dissection's time goes: cProfile of dissect_core.dissect at Broden-like sizes
(resnet18 at 224 px, masks 112 px, random weights, scenes in memory as in
bench_dissect_large.py), after a one-batch warm-up.

Prints each progress phase's seconds and the functions with the most time of their own and
in total (on a GPU, waits for the device show up where the host synchronises). With
``--out DIR`` the raw profile is written there (dissect.pstats, for pstats or snakeviz).

Usage: python bench/profile_dissect.py [--device cpu] [--images 512] [--layers layer4]
       [--batch-size 128] [--top 30] [--out DIR] [--overlap]

On a GPU the sketch runs inline here (the engine's default there is a second thread, which
cProfile before Python 3.12 does not see); ``--overlap`` keeps the default.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_dissect import timed_dissect  # noqa: E402
from bench_dissect_large import _InMemory, _model, warm_up  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--layers", default="layer4", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--overlap", action="store_true", help="on a GPU, the sketch on its second thread (unprofiled)")
    args = parser.parse_args()

    import importlib

    if not args.overlap:  # the sketch on this thread (the package's name `dissect` is the function)
        importlib.import_module("dissect_core.dissect")._OVERLAP_SKETCH_ON_GPU = False

    layers = args.layers.split(",")
    dataset = _InMemory(args.images, args.workers)
    model = _model()
    warm_up(model, dataset, layers, args.batch_size, args.device)
    profile = cProfile.Profile()
    profile.enable()
    total, phases = timed_dissect(model, dataset, layers, args.batch_size, args.device)
    profile.disable()
    print(f"{args.images} images, {args.layers} on {args.device}, batch {args.batch_size}: {total:.2f} s (profiled)")
    print("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).strip_dirs().sort_stats(key).print_stats(args.top)
        print(text.getvalue().split("\n", 6)[-1])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(str(args.out / "dissect.pstats"))


if __name__ == "__main__":
    main()

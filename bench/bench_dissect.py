"""Benchmark of dissect_core.dissect on a small trained model and synthetic data.

Prints a table: images/s of dissection, the ratio of dissection time to one bare
forward pass over the same images (same loader, preprocessing and batch size, so
the masks are decoded in both; target < 1.5x on CPU), the ratio to a forward pass
that decodes only the images (the mask reading then counts as dissection work),
and peak RSS at 1x and 4x the images (each measured in a fresh subprocess with
resource.getrusage; target: flat).

Usage: python bench/bench_dissect.py [--images 500] [--layers conv5 ...] [--demo DIR] [--device cpu] [--sketch-thread]

The model is the demo classifier (dissect_core.demo.make_demo, built once into
--demo); without dissect_core.demo a randomly initialised builtin:scenecnn on
synthetic scenes is used and the output says so.
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


def _setup(demo_dir: Path, n_needed: int) -> tuple[object, object, str]:
    import torch

    from dissect_core.models import load_model

    try:
        from dissect_core.demo import make_demo
    except ImportError:
        make_demo = None
    if make_demo is not None:
        if n_needed > 3000:  # a demo of its own size (an existing demo is reused as it is)
            demo_dir = demo_dir.with_name(f"{demo_dir.name}-{n_needed}")
        paths = make_demo(demo_dir, n_images=max(3000, n_needed), generator=False, segmenter=False, progress=None)
        config = json.loads(Path(paths.config).read_text())
        from dissect_core.broden import BrodenDataset

        model = load_model(
            config["arch"],
            paths.weights,
            config["num_classes"],
            input_size=config["input_size"],
            mean=config["mean"],
            std=config["std"],
        )
        dataset = BrodenDataset(paths.data)
        what = f"demo classifier {config['arch']} (val acc {config.get('val_accuracy') or 0:.2f}), Broden synthetic"
    else:
        from dissect_core.synthetic import SyntheticScenes

        torch.manual_seed(0)
        model = load_model("builtin:scenecnn", num_classes=6, input_size=64)
        dataset = SyntheticScenes(max(3000, n_needed), seed=0, image_size=(64, 64))
        what = "RANDOMLY INITIALISED builtin:scenecnn (no dissect_core.demo), in-memory synthetic scenes"
    return model, dataset, what


def _bare_forward(model, dataset, indices, batch_size: int, device: str) -> None:
    import torch
    from torch.utils.data import DataLoader

    from dissect_core.concepts import collate_samples
    from dissect_core.dissect import _Indexed, preprocess_images

    cuda = torch.device(device).type == "cuda"  # pinned host batches, as dissect's own loader on a GPU
    loader = DataLoader(_Indexed(dataset, indices), batch_size=batch_size, collate_fn=collate_samples, pin_memory=cuda)
    module = model.module.to(device)
    with torch.no_grad():
        for batch in loader:
            module(
                preprocess_images(batch.images.to(device, non_blocking=True), model.input_size, model.mean, model.std)
            )
    if cuda:
        torch.cuda.synchronize()


def timed_dissect(model, dataset, layers, batch_size: int, device: str, indices=None) -> tuple[float, dict[str, float]]:
    """One dissection: (seconds, seconds per progress phase)."""
    from dissect_core.dissect import dissect

    marks: list[tuple[str, float]] = []
    start = time.perf_counter()
    dissect(
        model,
        dataset,
        layers,
        batch_size=batch_size,
        device=device,
        indices=indices,
        progress=lambda phase, done, total: marks.append((phase, time.perf_counter() - start)),
    )
    total = time.perf_counter() - start
    phases: dict[str, float] = {}
    for i, (phase, t) in enumerate(marks):
        nxt = marks[i + 1][1] if i + 1 < len(marks) else total
        phases[phase] = phases.get(phase, 0.0) + (nxt - t)
    return total, phases


def phase_summary(phases: dict[str, float]) -> str:
    """ "forward / count / other" seconds of :func:`timed_dissect`'s phases."""
    other = sum(v for k, v in phases.items() if k not in ("forward", "count"))
    return f"{phases.get('forward', 0):.2f} / {phases.get('count', 0):.2f} / {other:.2f}"


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows of (metric, value, ...): the first is the header; metrics left-aligned, values
    right-aligned, further columns as they are."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), *r[2:]]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * n for n in widths))


class _ImagesOnly:
    """The Broden dataset's images alone (no masks decoded): the forward pass any use of the
    network needs, against which the mask reading is dissection work too."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from dissect_core.broden import read_rgb
        from dissect_core.concepts import Sample

        row = self.dataset._rows[index]
        image = read_rgb(self.dataset.images_dir / row.image, size=self.dataset.image_size)
        return Sample(
            image=image,
            label_maps=np.zeros((0, *self.dataset.mask_size), np.int32),
            image_labels=np.zeros(0, np.int32),
            class_label=-1,
        )


def _child(args: argparse.Namespace) -> None:
    import torch

    from dissect_core.dissect import dissect

    model, dataset, what = _setup(Path(args.demo), max(args.images, args.demo_images))
    if args.child == "setup":
        print(json.dumps({"what": what}))
        return
    indices = list(range(args.images))
    start = time.perf_counter()
    if args.child == "forward":
        _bare_forward(model, dataset, indices, args.batch_size, args.device)
    else:
        dissect(model, dataset, args.layers, batch_size=args.batch_size, device=args.device, indices=indices)
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "threads": torch.get_num_threads()}))


def _run_child(kind: str, images: int, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh interpreter (started while this one is still small,
    since ru_maxrss carries over the parent's size across fork and exec)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--images",
        str(images),
        "--demo",
        args.demo,
        "--demo-images",
        str(4 * args.images),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
    ]
    if args.sketch_thread:
        cmd.append("--sketch-thread")
    for layer in args.layers:
        cmd += ["--layers", layer]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--layers", action="append", default=None)
    parser.add_argument("--demo", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "dissect-bench-demo"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=["setup", "forward", "dissect"], default=None)
    parser.add_argument("--demo-images", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--sketch-thread",
        action="store_true",
        help="on the CPU too, feed the sketch on a second thread (the GPU default) to compare",
    )
    args = parser.parse_args()
    if args.sketch_thread:
        import importlib

        importlib.import_module("dissect_core.dissect")._OVERLAP_SKETCH_ON_CPU = True
    args.layers = args.layers or ["conv5"]
    if args.child:
        _child(args)
        return

    _run_child("setup", 4 * args.images, args)
    rss = {k: _run_child(k, args.images, args) for k in ("forward", "dissect")}
    rss4 = {k: _run_child(k, 4 * args.images, args) for k in ("forward", "dissect")}

    import torch

    from dissect_core.dissect import dissect
    from dissect_core.models import list_layers

    model, dataset, what = _setup(Path(args.demo), 4 * args.images)
    indices = list(range(args.images))
    shapes = {i.name: i for i in list_layers(model)}
    dissect(model, dataset, args.layers, batch_size=args.batch_size, device=args.device, indices=indices[:64])
    forward_s: list[float] = []
    runs: list[tuple[float, dict[str, float]]] = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        _bare_forward(model, dataset, indices, args.batch_size, args.device)
        forward_s.append(time.perf_counter() - start)
        runs.append(timed_dissect(model, dataset, args.layers, args.batch_size, args.device, indices))
    images_only_s: list[float] = []
    if hasattr(dataset, "_rows"):
        for _ in range(args.repeat):
            start = time.perf_counter()
            _bare_forward(model, _ImagesOnly(dataset), indices, args.batch_size, args.device)
            images_only_s.append(time.perf_counter() - start)
    fwd = min(forward_s)
    dis, phases = min(runs, key=lambda run: run[0])

    layer_desc = ", ".join(
        f"{name} ({shapes[name].units}x{shapes[name].height}x{shapes[name].width})" for name in args.layers
    )
    mask = "x".join(str(v) for v in dataset.mask_size)
    print(f"model:   {what}")
    print(f"layers:  {layer_desc}; masks {mask}; {len(dataset.concepts)} concepts")
    sketch = "sketch on a second thread" if args.device != "cpu" or args.sketch_thread else "sketch inline"
    print(
        f"machine: {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"batch {args.batch_size}; {sketch}; best of {args.repeat}"
    )
    rows = [
        ("metric", "value", "target"),
        ("images", f"{args.images}", ""),
        ("bare forward, same loader (images + masks), s", f"{fwd:.2f}", ""),
        ("dissection, s", f"{dis:.2f}", ""),
        ("dissection, images/s", f"{args.images / dis:.0f}", ""),
        ("dissection / forward", f"{dis / fwd:.2f}x", "< 1.5x"),
    ]
    if images_only_s:
        img = min(images_only_s)
        rows += [
            ("bare forward decoding the images only, s", f"{img:.2f}", ""),
            ("dissection / images-only forward", f"{dis / img:.2f}x", ""),
        ]
    rows += [
        ("  phases: forward+sketch / count / other, s", phase_summary(phases), ""),
        (
            f"peak RSS forward, {args.images} / {4 * args.images} images",
            f"{rss['forward']['rss_mb']:.0f} / {rss4['forward']['rss_mb']:.0f} MB",
            "",
        ),
        (
            f"peak RSS dissect, {args.images} / {4 * args.images} images",
            f"{rss['dissect']['rss_mb']:.0f} / {rss4['dissect']['rss_mb']:.0f} MB",
            "flat",
        ),
        ("dissect RSS growth at 4x", f"{rss4['dissect']['rss_mb'] - rss['dissect']['rss_mb']:+.0f} MB", "~0"),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()

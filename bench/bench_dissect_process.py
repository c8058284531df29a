"""A whole dissection process against a whole bare-forward process (issue #20's high-upsampling case).

    .venv/bin/python bench/bench_dissect_process.py [--images 2400] [--repeat 2]

shufflenet_v2_x1_0 (random weights, 6 classes) at 112 px, layers ``stage3`` and ``stage4``
(7 x 7 and 4 x 4 maps; masks at 56 px: 8x and 14x upsampling), on synthetic scenes at 112 px
written once as a Broden directory under ``var/bench``. Two commands, each timed from start
to exit (interpreter start, imports, loading, decoding included), alternated, best of
``--repeat``:

- ``python -m dissect_core dissect --model torchvision:shufflenet_v2_x1_0 ... --layer stage3
  --layer stage4`` (the CLI a user runs);
- the same process doing no more than load the model and the dataset, decode every image
  through the same data loader and run one forward pass over each batch.

Also: each process's start-up alone (the commands on 1 image). Target: at most 2x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCH = "shufflenet_v2_x1_0"
LAYERS = ["stage3", "stage4"]
TARGET = 2.0

BARE = """
import sys, torch
from torch.utils.data import DataLoader
from dissect_core.concepts import collate_samples
from dissect_core.datasets import open_dataset
from dissect_core.dissect import preprocess_images
from dissect_core.models import load_model

weights, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = load_model("torchvision:{arch}", weights, 6, input_size=112)
dataset = open_dataset(data, max_images=n)


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return len(dataset)

    def __getitem__(self, i):
        return i, dataset[i]


loader = DataLoader(Rows(), batch_size=64, collate_fn=collate_samples)
with torch.no_grad():
    for batch in loader:
        model.module(preprocess_images(batch.images, model.input_size, model.mean, model.std))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import torch
    import torchvision
    from safetensors.torch import save_file

    from dissect_core.synthetic import generate

    var = ROOT / "var" / "bench"
    scenes = var / f"scenes112-{args.images}"
    if not (scenes / "index.csv").exists():
        generate(scenes, n_images=args.images, seed=7, image_size=(112, 112))
    weights = var / f"{ARCH}-6.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        net = getattr(torchvision.models, ARCH)(num_classes=6)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    data = f"broden:{scenes}"

    def dissect_command(n: int, out: str) -> list[str]:
        layers = [a for layer in LAYERS for a in ("--layer", layer)]
        return [
            sys.executable,
            "-m",
            "dissect_core",
            "dissect",
            "--model",
            f"torchvision:{ARCH}",
            "--weights",
            str(weights),
            "--num-classes",
            "6",
            "--input-size",
            "112",
            "--dataset",
            data,
            "--max-images",
            str(n),
            *layers,
            "--out",
            out,
            "--no-progress",
        ]

    def bare_command(n: int) -> list[str]:
        return [sys.executable, "-c", BARE.format(arch=ARCH), str(weights), data, str(n)]

    def seconds(command: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bench-dissect-process-") as tmp:
        runs: dict[str, list[float]] = {"bare": [], "dissect": [], "bare start": [], "dissect start": []}
        for i in range(args.repeat):
            runs["bare"].append(seconds(bare_command(args.images)))
            runs["dissect"].append(seconds(dissect_command(args.images, f"{tmp}/run{i}")))
            runs["bare start"].append(seconds(bare_command(1)))
            runs["dissect start"].append(seconds(dissect_command(1, f"{tmp}/start{i}")))
    best = {name: min(values) for name, values in runs.items()}
    print(
        f"{ARCH} at 112 px, {', '.join(LAYERS)} (masks 56 px), {args.images} synthetic scenes; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, best of {args.repeat}"
    )
    print(f"{'process':<44}{'seconds':>9}{'1 image':>9}{'ratio':>8}{'target':>8}")
    print(f"{'bare forward (load, decode, forward)':<44}{best['bare']:>9.2f}{best['bare start']:>9.2f}")
    ratio = best["dissect"] / best["bare"]
    print(
        f"{'python -m dissect_core dissect':<44}{best['dissect']:>9.2f}{best['dissect start']:>9.2f}"
        f"{ratio:>7.1f}x{TARGET:>7.0f}x"
    )


if __name__ == "__main__":
    main()

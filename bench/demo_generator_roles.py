"""The paper's generator experiments on the demo GAN (make-demo trains it).

Dissects layer3 on 1,000 samples labelled by the demo segmenter, removes the top units of a
few concepts (Figure 4a) and maps where tree units add trees (Figure 4d). Prints what it
measures.

Usage: .venv/bin/python bench/demo_generator_roles.py [--demo var/data/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dissect_core.dissect import dissect  # noqa: E402
from dissect_core.generators import GeneratedDataset, insertion_map, load_generator, removal_curve, unit_quantiles  # noqa: E402
from dissect_core.models import load_model  # noqa: E402
from dissect_core.segmenter import Segmenter  # noqa: E402

CONCEPTS = ("tree", "house", "sky", "grass")
KS = (1, 2, 4, 8, 12, 16, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(ROOT / "var" / "data" / "demo"))
    args = parser.parse_args()
    demo = Path(args.demo)
    gm = json.loads((demo / "generator.json").read_text())
    sm = json.loads((demo / "segmenter.json").read_text())
    gen = load_generator(gm["arch"], demo / "generator.safetensors", latent_dim=gm["latent_dim"])
    seg_model = load_model(
        sm["arch"],
        demo / "segmenter.safetensors",
        sm["num_classes"],
        input_size=sm["input_size"][0],
        mean=sm["mean"],
        std=sm["std"],
    )
    seg = Segmenter(
        seg_model.module,
        sm["labels"],
        categories=sm["categories"],
        mean=sm["mean"],
        std=sm["std"],
        input_size=tuple(sm["input_size"]),
    )

    start = time.time()
    res = dissect(gen, GeneratedDataset(gen, seg, 1000, seed=0, batch_size=64), ["layer3"], top_k_images=0)["layer3"]
    print(f"dissect 1000 samples: {time.time() - start:.1f}s")
    names = [c.name for c in seg.concepts]
    iou = np.asarray(res.iou)
    detectors = Counter(names[c] for c, best in zip(iou.argmax(1), iou.max(1)) if best >= 0.04)
    print("detectors:", detectors.most_common())

    for concept in CONCEPTS:
        c = names.index(concept)
        ranked = [int(u) for u in np.argsort(-iou[:, c], kind="stable")]
        start = time.time()
        curve = removal_curve(gen, seg, "layer3", ranked, c + 1, ks=list(KS), count=200, seed=1)
        changes = " ".join(f"k{k}:{100 * ch:+.1f}%" for k, ch in zip(curve.ks, curve.relative_change) if ch is not None)
        print(
            f"{concept} top IoU {iou[ranked[0], c]:.3f} baseline {100 * curve.baseline:.2f}% {changes} "
            f"({time.time() - start:.1f}s)"
        )
        if concept != "tree":
            continue
        units = ranked[:20]
        values = unit_quantiles(gen, "layer3", q=0.995, seed=7919, units=units)
        start = time.time()
        ins = insertion_map(gen, seg, "layer3", units, c + 1, values=values, count=16, seed=1, stride=2)
        m = ins.map
        print(
            f"insert tree: mean {100 * ins.mean_fraction:.2f}% max {100 * np.nanmax(m):.2f}% "
            f"min {100 * np.nanmin(m):.2f}% at best {ins.best_position} ({time.time() - start:.1f}s)"
        )
        rows, cols = np.flatnonzero(ins.tested.any(1)), np.flatnonzero(ins.tested.any(0))
        for y in rows:
            print(" ".join(f"{100 * m[y, x]:4.1f}" for x in cols))


if __name__ == "__main__":
    main()

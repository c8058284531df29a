"""The demo classifier's conv5 sparsity against the paper's Figure 2d, one row per activation penalty.

For each weight of the L1 penalty on conv5's mean activation (dissect_core.train.train_classifier
``activation_l1``; the demo uses dissect_core.demo.DEMO_ACTIVATION_L1), train the demo classifier
(seed 0, 10 epochs, as make-demo does) on the demo's synthetic scenes and measure:

- validation accuracy, and the share of conv5 positions that fire (> 0) on 256 validation images;
- dissection of conv5 on all the scenes: units labelled (best IoU >= 0.04);
- the set experiment (single-unit importance on "train", sets on "val"): mean over classes of
  balanced accuracy at baseline, with each class's 20 most important units removed, and with all
  units but those 20 removed (paper, VGG-16 conv5_3 on Places365: 53.0% and baseline - 3.6%),
  then the k = 20 values per class.

About 2.5 minutes per row on two CPU cores.

Usage: python bench/demo_classifier_sparsity.py [--demo var/data/demo] [--l1 0,2,3,5,10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=ROOT / "var/data/demo")
    parser.add_argument("--l1", default="0,2,3,5,10", help="comma-separated penalty weights")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    import numpy as np
    import torch

    from dissect_core.ablation import ablate_sets, unit_importance
    from dissect_core.broden import BrodenDataset
    from dissect_core.demo import DEMO_ACTIVATION_L1, DEMO_ARCH, DEMO_LAYER, make_demo
    from dissect_core.dissect import dissect
    from dissect_core.models import LoadedModel
    from dissect_core.train import load_class_arrays, normalize, train_classifier

    paths = make_demo(args.demo, generator=False, segmenter=False, progress=None)
    every = BrodenDataset(paths.data)
    train = BrodenDataset(paths.data, split="train")
    val = BrodenDataset(paths.data, split="val")
    val_images, _ = load_class_arrays(val)
    print(
        f"demo classifier {DEMO_ARCH}, layer {DEMO_LAYER}, {len(train)} train / {len(val)} val images, "
        f"{args.epochs} epochs, torch threads {torch.get_num_threads()}; the demo uses activation_l1 "
        f"{DEMO_ACTIVATION_L1}"
    )
    header = (
        f"{'l1':>5} {'val acc':>8} {'firing':>7} {'labelled':>9} {'baseline':>9} {'rm top20':>9} "
        f"{'keep top20':>11} {'seconds':>8}"
    )
    print(header)
    details = []
    for weight in [float(w) for w in args.l1.split(",")]:
        start = time.monotonic()
        module, info = train_classifier(
            train,
            val_dataset=val,
            arch=DEMO_ARCH,
            epochs=args.epochs,
            seed=0,
            activation_l1=weight,
            l1_layer=DEMO_LAYER if weight > 0 else None,
        )
        model = LoadedModel(
            module=module,
            arch=DEMO_ARCH,
            num_classes=info["num_classes"],
            input_size=tuple(info["input_size"]),
            mean=tuple(info["mean"]),
            std=tuple(info["std"]),
            kind="builtin",
            classes=info["classes"],
        )
        fired: list[float] = []
        handle = module.get_submodule(DEMO_LAYER).register_forward_hook(
            lambda _m, _i, out, fired=fired: fired.append(float((out > 0).float().mean()))
        )
        with torch.no_grad():
            module(normalize(val_images[:256], info["mean"], info["std"]))
        handle.remove()
        iou = np.asarray(dissect(model, every, [DEMO_LAYER], top_k_images=0)[DEMO_LAYER].iou)
        labelled = int((iou.max(1) >= 0.04).sum())
        importance = unit_importance(model, train, DEMO_LAYER)
        sets = ablate_sets(model, val, DEMO_LAYER, importance, ks=[20])
        s = sets.summary(20)
        print(
            f"{weight:>5g} {info['val_accuracy'][-1]:>8.3f} {fired[0]:>7.3f} {labelled:>5}/{iou.shape[0]:<3} "
            f"{s['baseline']:>9.3f} {s['removed_top']:>9.3f} {s['kept_top']:>11.3f} "
            f"{time.monotonic() - start:>8.0f}",
            flush=True,
        )
        details.append((weight, [(r["class"], r["baseline"], r["removed_top"], r["kept_top"]) for r in sets.rows()]))
    print("\nper class at k = 20 (baseline / top 20 removed / all but the top 20 removed):")
    for weight, rows in details:
        print(f"l1 {weight:g}: " + "; ".join(f"{c} {b:.2f}/{r:.2f}/{k:.2f}" for c, b, r, k in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

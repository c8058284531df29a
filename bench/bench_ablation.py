"""Benchmark of single-unit ablation on the demo classifier, and the paper's headline check.

Single-unit importance of every unit of ``conv5`` on the training split, two ways:

- cached prefix (dissect_core.ablation.unit_importance): the network up to conv5
  runs once per image; the rest (avgpool, fc) runs on B images x G ablations at a
  time;
- naive: one full forward pass over the split per ablation (the reference code's
  way). It is timed on ``--naive-units`` units plus the baseline pass and
  extrapolated to 1 + U passes; twice: with the images decoded once and kept in
  memory (forward passes only, the fairest to the naive method), and through the
  data loader every pass as the reference does (one pass, extrapolated).

The naive results on the timed units are checked against the batched ones
(balanced accuracy equal, margins to 1e-5). Then the set experiment on the
validation split: mean over classes of balanced accuracy at baseline, with the 20
most important units removed, and with all but those 20 removed (Fig. 2d).

Usage: python bench/bench_ablation.py [--demo var/data/demo] [--naive-units 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=ROOT / "var/data/demo")
    parser.add_argument("--layer", default="conv5")
    parser.add_argument("--naive-units", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()

    import numpy as np
    import torch

    from dissect_core.ablation import (
        AblationCounts,
        UnitImportance,
        ablate_sets,
        class_predictions,
        split_network,
        unit_importance,
        zero_units,
    )
    from dissect_core.broden import BrodenDataset
    from dissect_core.demo import make_demo
    from dissect_core.dissect import preprocess_images
    from dissect_core.models import load_model
    from dissect_core.nethook import trace

    paths = make_demo(args.demo, generator=False, segmenter=False, progress=None)
    config = json.loads(Path(paths.config).read_text())
    model = load_model(
        config["arch"],
        paths.weights,
        config["num_classes"],
        input_size=config["input_size"],
        mean=config["mean"],
        std=config["std"],
        classes=config["classes"],
    )
    train = BrodenDataset(paths.data, split="train")
    val = BrodenDataset(paths.data, split="val")
    split = split_network(model, args.layer, device=args.device)
    units = split.shape[0]
    load_before = _load()
    print(
        f"model {config['arch']} (val acc {config.get('val_accuracy') or 0:.3f}), layer {args.layer}: {units} units "
        f"{split.shape[1]}x{split.shape[2]}, suffix '{split.kind}'; {len(train)} train / {len(val)} val images; "
        f"device {args.device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
    )

    chosen = [int(u) for u in np.linspace(0, units - 1, args.naive_units).round()]
    module = model.module.to(args.device).eval()
    t0 = time.perf_counter()
    images, labels = [], []
    for i in range(len(train)):
        sample = train[i]
        images.append(torch.from_numpy(sample.image).permute(2, 0, 1))
        labels.append(sample.class_label)
    decoded = torch.stack(images)
    y = torch.tensor(labels, dtype=torch.long)
    decode_s = time.perf_counter() - t0

    def naive_pass(edit: dict | None) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(decoded), args.batch_size):
                x = preprocess_images(
                    decoded[start : start + args.batch_size].to(args.device), model.input_size, model.mean, model.std
                )
                with trace(module, [], edit=edit or {}) as tr:
                    out.append(tr(x).float().cpu())
        return torch.cat(out)

    def naive_round() -> tuple[AblationCounts, list[float]]:
        counts = AblationCounts.empty(1 + len(chosen), split.num_classes)
        seconds = []
        for j, u in enumerate([None, *chosen]):
            t = time.perf_counter()
            logits = naive_pass(None if u is None else {args.layer: zero_units([u])})
            seconds.append(time.perf_counter() - t)
            counts._add_rows(logits.unsqueeze(0), y, j)
        counts._add_images(y)
        return counts, seconds

    def cached_round() -> tuple[UnitImportance, float, float]:
        stamps: dict[str, float] = {}

        def progress(phase: str, done: int, total: int) -> None:
            stamps[f"{phase}-end"] = time.perf_counter()

        t = time.perf_counter()
        result = unit_importance(
            model, train, args.layer, batch_size=args.batch_size, device=args.device, progress=progress
        )
        total = time.perf_counter() - t
        return result, total, stamps["cache-end"] - t

    counts, naive_a = naive_round()
    importance, cached_a, cache_a = cached_round()
    _, naive_b = naive_round()
    _, cached_b, cache_b = cached_round()
    naive_times = naive_a + naive_b
    per_pass_mem = float(np.min(naive_times))
    cached_s, cache_s = min((cached_a, cache_a), (cached_b, cache_b))
    ablate_s = cached_s - cache_s

    t0 = time.perf_counter()
    class_predictions(
        model, train, batch_size=args.batch_size, device=args.device, edit={args.layer: zero_units([chosen[0]])}
    )
    per_pass_loader = time.perf_counter() - t0

    naive = UnitImportance.from_counts(args.layer, importance.classes, np.asarray(chosen), counts)
    rows = [importance.units.tolist().index(u) for u in chosen]
    agree_ba = np.array_equal(naive.balanced_accuracy, importance.balanced_accuracy[rows])
    agree_margin = float(np.max(np.abs(naive.margin_drop - importance.margin_drop[rows])))

    passes = 1 + units
    naive_mem_total = per_pass_mem * passes + decode_s
    naive_loader_total = per_pass_loader * passes
    load_after = _load()

    print()
    print(
        f"single-unit importance, all {units} units of {args.layer}, {len(train)} training images "
        f"(1 + {units} = {passes} networks)"
    )
    print(f"{'method':<62}{'seconds':>10}{'speedup':>9}")
    print(f"{'cached prefix + batched suffix (best of 2 runs, incl. decoding)':<62}{cached_s:>10.2f}{1.0:>9.1f}")
    print(f"{'  decode + prefix forward into the cache':<62}{cache_s:>10.2f}")
    print(f"{f'  {passes} ablations x {len(train)} images through the suffix':<62}{ablate_s:>10.2f}")
    label = f"naive, images decoded once (best pass of {len(naive_times)} x {passes}, extrap.)"
    print(f"{label:<62}{naive_mem_total:>10.1f}{naive_mem_total / cached_s:>9.1f}")
    print(f"{'  decoding once':<62}{decode_s:>10.2f}")
    print(f"{'  one full forward pass (best; median ' + f'{np.median(naive_times):.2f}s)':<62}{per_pass_mem:>10.2f}")
    label = f"naive, data loader every pass (1 pass x {passes}, extrap.)"
    print(f"{label:<62}{naive_loader_total:>10.1f}{naive_loader_total / cached_s:>9.1f}")
    print(
        f"naive vs batched on units {chosen}: balanced accuracy {'identical' if agree_ba else 'DIFFERENT'}, "
        f"max |margin drop difference| {agree_margin:.2e}"
    )
    print(
        f"ties: units per class whose balanced accuracy equals another unit's: "
        f"{dict(zip(importance.classes, importance.tied.tolist()))}; removal changes nothing: "
        f"{dict(zip(importance.classes, importance.unchanged.tolist()))}"
    )

    t0 = time.perf_counter()
    sets = ablate_sets(model, val, args.layer, importance, batch_size=args.batch_size, device=args.device)
    sets_s = time.perf_counter() - t0
    s = sets.summary(args.k)
    print()
    print(
        f"set ablation on the validation split ({len(val)} images, {len(sets.class_indices)} classes, "
        f"k in {sets.ks.tolist()}, {1 + 2 * sets.removed_top.size} networks in one cached pass: {sets_s:.1f}s)"
    )
    print(f"{'mean over classes (k = ' + str(s['k']) + ')':<40}{'balanced acc':>14}{'all-class acc':>15}")
    print(f"{'baseline':<40}{s['baseline']:>14.3f}{s['baseline_accuracy']:>15.3f}")
    print(
        f"{'remove the ' + str(s['k']) + ' most important':<40}{s['removed_top']:>14.3f}"
        f"{s['removed_top_accuracy']:>15.3f}"
    )
    print(
        f"{'remove all but the ' + str(s['k']) + ' most important':<40}{s['kept_top']:>14.3f}"
        f"{s['kept_top_accuracy']:>15.3f}"
    )
    print()
    print("mean balanced accuracy by k:  " + "  ".join(f"{int(k)}".rjust(6) for k in sets.ks))
    print("  remove the k most important " + "  ".join(f"{v:6.3f}" for v in np.nanmean(sets.removed_top, 0)))
    print("  keep only the k most import." + "  ".join(f"{v:6.3f}" for v in np.nanmean(sets.kept_top, 0)))
    print()
    print(
        f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} cpus"
        + (
            " - the machine was shared and loaded; timings are noisy"
            if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1)
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

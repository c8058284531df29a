"""Command line: ``python -m dissect_core {dissect,layers,make-demo,make-synthetic} ...``.

``dissect`` writes, per layer, ``OUT/LAYER/units.csv`` (unit,label,category,iou,threshold,
then the label's evidence: iou_low,iou_high,stability,runner_up,runner_up_iou,margin,
chance_iou,p_value; empty where there is none) and ``OUT/LAYER/iou.csv``
(unit,concept,category,iou,iou_low,iou_high: every unit x concept pair), plus
``OUT/LAYER/summary.json``. Bad input prints one line ``error: ...`` and exits
with status 2.

``ablate`` ranks each unit's importance to each class on the training split and
removes sets of units on the validation split, writing ``OUT/LAYER/importance.csv``
(class,class_index,rank,unit,balanced_accuracy,drop,margin_drop), ``OUT/LAYER/sets.csv``
(class,class_index,k,baseline,removed_top,kept_top,removed_top_accuracy,kept_top_accuracy),
``OUT/LAYER/ablation.npz`` (the results' state dicts) and ``OUT/LAYER/ablation.json``
(headline numbers; with ``--attack-images`` also the adversarial unit changes).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DissectError
from .options import RunOptions
from .progress import ProgressFn

__all__ = ["build_parser", "main", "read_meta", "write_layer_csvs"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m dissect_core", description="Network dissection (Bau et al. 2020).")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser, weights_required: bool) -> None:
        p.add_argument("--model", required=True, help="torchvision:ARCH, builtin:NAME or torchscript")
        p.add_argument(
            "--weights",
            required=weights_required,
            type=Path,
            help=".safetensors, .pt/.pth (weights only) or the TorchScript file",
        )
        p.add_argument("--num-classes", type=int, default=None)
        p.add_argument("--input-size", type=int, default=None, help="network input size (square)")
        p.add_argument(
            "--meta",
            type=Path,
            default=None,
            help="JSON with input_size, mean, std, num_classes (default: WEIGHTS.json or "
            "classifier.json next to the weights)",
        )
        p.add_argument(
            "--latent-dim",
            type=int,
            default=None,
            help="the model is a generator with latents of this size (builtin:dcgan, torchscript)",
        )

    d = sub.add_parser("dissect", help="dissect layers and write CSVs")
    model_args(d, weights_required=True)
    d.add_argument(
        "--dataset",
        default=None,
        help="broden:DIR, imagefolder:DIR, synthetic:DIR or synthetic:N[:SEED] (not with --generated)",
    )
    d.add_argument(
        "--generated",
        type=int,
        default=None,
        help="dissect a generator (--latent-dim) on N generated images labelled by colour names",
    )
    d.add_argument("--seed", type=int, default=0, help="latent seed of --generated")
    d.add_argument("--layer", action="append", required=True, dest="layers", help="dotted layer name (repeatable)")
    d.add_argument("--quantile", type=float, default=0.99)
    d.add_argument(
        "--evidence-blocks",
        type=int,
        default=16,
        help="blocks of images for each label's interval, stability and p-value (1: none; default 16)",
    )
    d.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the blocks (default 1000)")
    d.add_argument("--evidence-seed", type=int, default=0, help="seed of the resamples (default 0)")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--colors", action="store_true", help="add colour-name concepts")
    d.add_argument("--parts", action="store_true", help="add object-part concepts (obj-t, obj-b, obj-l, obj-r)")
    d.add_argument("--split", default=None, help="dataset split to use (train, val)")
    d.add_argument("--max-images", type=int, default=None)
    d.add_argument("--num-workers", type=int, default=0)
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--no-progress", action="store_true")

    ls = sub.add_parser("layers", help="print the layers with feature-map outputs")
    model_args(ls, weights_required=False)

    demo = sub.add_parser(
        "make-demo", help="generate the synthetic demo dataset and train its classifier, GAN and segmenter"
    )
    demo.add_argument("--out", required=True, type=Path)
    demo.add_argument("--n-images", type=int, default=None)
    demo.add_argument("--epochs", type=int, default=None, help="classifier training epochs")
    demo.add_argument(
        "--no-generator", action="store_true", help="skip the generator half (GAN and segmenter training)"
    )
    demo.add_argument("--no-segmenter", action="store_true", help="skip the segmenter training")
    demo.add_argument("--gan-steps", type=int, default=None)
    demo.add_argument("--segmenter-epochs", type=int, default=None)
    demo.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the GAN and segmenter training (default 2; 1 on a busy machine)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true")

    syn = sub.add_parser("make-synthetic", help="write a synthetic Broden dataset")
    syn.add_argument("--out", required=True, type=Path)
    syn.add_argument("--n", type=int, required=True)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--image-size", type=int, default=None)

    ab = sub.add_parser("ablate", help="unit importance per class by ablation, and set removals")
    model_args(ab, weights_required=True)
    ab.add_argument("--dataset", required=True, help="a dataset with train/val splits and scene classes")
    ab.add_argument("--layer", required=True, help="dotted layer name")
    ab.add_argument("--train-split", default="train")
    ab.add_argument("--val-split", default="val")
    ab.add_argument("--ks", default=None, help="comma-separated set sizes (default 1,2,3,4,5,20,64,128,256) or 'all'")
    ab.add_argument("--headline-k", type=int, default=20)
    ab.add_argument("--max-images", type=int, default=None, help="at most this many images per split")
    ab.add_argument(
        "--attack-images",
        type=int,
        default=0,
        help="also attack this many validation images (PGD) and report unit peak changes",
    )
    ab.add_argument("--batch-size", type=int, default=64)
    ab.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ab.add_argument("--out", required=True, type=Path)
    ab.add_argument("--no-progress", action="store_true")
    return parser


def read_meta(meta: Path | None, weights: Path | None) -> dict[str, Any]:
    """The model description next to the weights, if any.

    Args:
        meta: an explicit JSON file (must exist).
        weights: the weights file; ``WEIGHTS.json`` or ``classifier.json`` beside it is used.

    Returns:
        the parsed JSON object (empty when there is none).

    Raises:
        DissectError: an explicit file is missing or not a JSON object.
    """
    candidates = [meta] if meta is not None else []
    if meta is None and weights is not None:
        candidates = [weights.with_suffix(".json"), weights.parent / "classifier.json"]
    for path in candidates:
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise DissectError(f"cannot read model description {path}: {exc}") from None
            if not isinstance(data, dict):
                raise DissectError(f"model description {path} is not a JSON object")
            return data
        if meta is not None:
            raise DissectError(f"model description {path} does not exist")
    return {}


def _load(args: argparse.Namespace) -> Any:
    from .models import load_model

    if args.latent_dim is not None:
        from .generators import load_generator

        return load_generator(args.model, args.weights, latent_dim=args.latent_dim)
    meta = read_meta(args.meta, args.weights)
    input_size = args.input_size if args.input_size is not None else meta.get("input_size")
    return load_model(
        args.model,
        args.weights,
        args.num_classes if args.num_classes is not None else meta.get("num_classes"),
        input_size=input_size,
        mean=meta.get("mean"),
        std=meta.get("std"),
        classes=meta.get("classes"),
    )


_EVIDENCE_COLUMNS = (
    "iou_low",
    "iou_high",
    "stability",
    "runner_up",
    "runner_up_iou",
    "margin",
    "chance_iou",
    "p_value",
)


def write_layer_csvs(result: Any, out_dir: Path) -> Path:
    """Write one layer's units.csv, iou.csv and summary.json.

    Args:
        result: a :class:`~dissect_core.dissect.LayerResult`.
        out_dir: the run's output directory; files go to ``out_dir/LAYER/``.

    Returns:
        the layer's directory.
    """
    layer_dir = out_dir / result.layer
    layer_dir.mkdir(parents=True, exist_ok=True)
    evidence = result.evidence

    def num(value: Any) -> str:
        return "" if value is None else repr(float(value))

    with open(layer_dir / "units.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["unit", "label", "category", "iou", "threshold", *_EVIDENCE_COLUMNS])
        for row in result.unit_rows():
            extra = [""] * len(_EVIDENCE_COLUMNS)
            if evidence is not None and evidence.label[row["unit"]] >= 0:
                e = evidence.unit(row["unit"])
                runner = result.concepts[e["runner_up"]].name if e["runner_up"] >= 0 else ""
                low, high = e["iou_ci"] or (None, None)
                extra = [num(low), num(high), num(e["stability"]), runner, num(e["runner_up_iou"])]
                extra += [num(e["margin"]), num(e["chance_iou"]), num(e["p_value"])]
            writer.writerow(
                [row["unit"], row["label"], row["category"], repr(row["iou"]), repr(row["threshold"]), *extra]
            )
    with open(layer_dir / "iou.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["unit", "concept", "category", "iou", "iou_low", "iou_high"])
        for i, row in enumerate(result.iou_rows()):
            u, c = divmod(i, len(result.concepts))
            interval = ["", ""] if evidence is None else [num(evidence.low[u, c]), num(evidence.high[u, c])]
            writer.writerow([row["unit"], row["concept"], row["category"], repr(row["iou"]), *interval])
    summary = result.summary()
    summary.update({"quantile": result.quantile, "images": result.n_images})
    (layer_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return layer_dir


def _run_options(args: argparse.Namespace, progress: ProgressFn) -> RunOptions:
    """The run options every pass of a command gets: ``--batch-size``, ``--device``, ``--num-workers`` (0 where absent)."""
    return {
        "batch_size": args.batch_size,
        "device": args.device,
        "num_workers": getattr(args, "num_workers", 0),
        "progress": progress,
    }


class _Bars:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if phase != self.phase or self.bar is None:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, desc=phase, unit="img", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_dissect(args: argparse.Namespace) -> int:
    from .datasets import open_dataset
    from .dissect import dissect, resize_note

    if not 0.0 <= args.quantile <= 1.0:
        raise DissectError(f"--quantile must lie in [0, 1], got {args.quantile}")
    if (args.dataset is None) == (args.generated is None):
        raise DissectError("give either --dataset or --generated N (with --latent-dim)")
    if args.generated is not None and args.latent_dim is None:
        raise DissectError("--generated needs --latent-dim (the model is a generator)")
    model = _load(args)
    if args.generated is not None:
        from .generators import GeneratedDataset

        dataset: Any = GeneratedDataset(
            model, "colors", args.generated, seed=args.seed, batch_size=args.batch_size, device=args.device
        )
    else:
        dataset = open_dataset(
            args.dataset, split=args.split, max_images=args.max_images, colors=args.colors, parts=args.parts
        )
    note = resize_note(model, dataset)
    if note:
        print(f"note: {note}", file=sys.stderr)
    bars = _Bars(not args.no_progress)
    try:
        results = dissect(
            model,
            dataset,
            args.layers,
            quantile=args.quantile,
            evidence_blocks=args.evidence_blocks,
            resamples=args.resamples,
            evidence_seed=args.evidence_seed,
            **_run_options(args, bars),
        )
    finally:
        bars.close()
    args.out.mkdir(parents=True, exist_ok=True)
    for result in results.values():
        layer_dir = write_layer_csvs(result, args.out)
        s = result.summary()
        evidence = s.get("evidence")
        extra = (
            f", {evidence['detectors_significant']} of them above chance at p < {evidence['max_p']}" if evidence else ""
        )
        print(
            f"{result.layer}: {s['units']} units, {s['detectors']} detectors (IoU >= 0.04){extra}, "
            f"{s['unique_concepts']} unique concepts -> {layer_dir}"
        )
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from .models import list_layers

    model = _load(args)
    problems: dict[str, str] = {}
    infos = list_layers(model, problems=problems)
    rows = [("name", "type", "units", "height", "width", "layout")]
    rows += [(i.name, i.type, str(i.units), str(i.height), str(i.width), i.layout.describe()) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.rjust(widths[c]) if c in (2, 3, 4) else v.ljust(widths[c]) for c, v in enumerate(r)).rstrip())
    for name, why in problems.items():
        print(f"not dissectable: {name}: {why}", file=sys.stderr)
    return 0


def _cmd_make_demo(args: argparse.Namespace) -> int:
    from .demo import make_demo

    kwargs: dict[str, Any] = {"seed": args.seed, "force": args.force}
    if args.n_images is not None:
        kwargs["n_images"] = args.n_images
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    if args.gan_steps is not None:
        kwargs["gan_steps"] = args.gan_steps
    if args.segmenter_epochs is not None:
        kwargs["segmenter_epochs"] = args.segmenter_epochs
    if args.threads is not None:
        if args.threads < 1:
            raise DissectError(f"--threads must be at least 1, got {args.threads}")
        kwargs["threads"] = args.threads
    kwargs["generator"] = not args.no_generator
    kwargs["segmenter"] = not (args.no_generator or args.no_segmenter)
    paths = make_demo(args.out, **kwargs)
    print(f"demo ready: dataset broden:{paths.data}, weights {paths.weights}, description {paths.config}")
    if kwargs["generator"]:
        print(f"generator {paths.generator} ({paths.generator_config})")
    if kwargs["segmenter"]:
        print(f"segmenter {paths.segmenter} ({paths.segmenter_config})")
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import generate

    if args.n < 1:
        raise DissectError("--n must be positive")
    kwargs: dict[str, Any] = {"n_images": args.n, "seed": args.seed}
    if args.image_size is not None:
        kwargs["image_size"] = (args.image_size, args.image_size)
    try:
        out = generate(args.out, **kwargs)
    except (ValueError, FileExistsError) as exc:
        raise DissectError(str(exc)) from None
    print(f"wrote synthetic dataset broden:{out}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    import numpy as np

    from .ablation import ablate_sets, unit_importance
    from .datasets import open_dataset

    model = _load(args)
    train = open_dataset(args.dataset, split=args.train_split, max_images=args.max_images)
    val = open_dataset(args.dataset, split=args.val_split, max_images=args.max_images)
    ks: Sequence[int] | None = None
    if args.ks and args.ks != "all":
        try:
            ks = [int(k) for k in args.ks.split(",") if k.strip()]
        except ValueError:
            raise DissectError(f"--ks must be comma-separated integers or 'all', got {args.ks!r}") from None
    bars = _Bars(not args.no_progress)
    run = _run_options(args, bars)
    try:
        importance = unit_importance(model, train, args.layer, **run)
        if args.ks == "all":
            ks = range(1, len(importance.units) + 1)
        sets = ablate_sets(model, val, args.layer, importance, ks=ks, **run)
        attack = None
        if args.attack_images > 0:
            from .attack import attack_unit_changes

            attack = attack_unit_changes(model, val, args.layer, importance, max_images=args.attack_images, **run)
    finally:
        bars.close()
    layer_dir = args.out / args.layer
    layer_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("importance.csv", list(importance.rows())), ("sets.csv", list(sets.rows()))):
        with open(layer_dir / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    arrays: dict[str, Any] = {}
    parts: list[tuple[str, Any]] = [("importance", importance), ("sets", sets)]
    if attack is not None:
        parts.append(("attack", attack))
    for prefix, result in parts:
        arrays.update({f"{prefix}.{k}": np.asarray(v) for k, v in result.state_dict().items()})
    np.savez_compressed(layer_dir / "ablation.npz", **arrays)
    headline = sets.summary(args.headline_k)
    report: dict[str, Any] = {
        "layer": args.layer,
        "units": len(importance.units),
        "classes": importance.classes,
        "tied": importance.tied.tolist(),
        "headline": headline,
    }
    if attack is not None:
        report["attack"] = attack.summary()
    (layer_dir / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.layer}: k={headline['k']}, mean balanced accuracy over {headline['classes']} classes: "
        f"baseline {headline['baseline']:.3f}, top {headline['k']} removed {headline['removed_top']:.3f}, "
        f"all but top {headline['k']} removed {headline['kept_top']:.3f} -> {layer_dir}"
    )
    return 0


_COMMANDS = {
    "dissect": _cmd_dissect,
    "layers": _cmd_layers,
    "make-demo": _cmd_make_demo,
    "make-synthetic": _cmd_make_synthetic,
    "ablate": _cmd_ablate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        the exit status: 0 on success, 2 on bad input.
    """
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except DissectError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

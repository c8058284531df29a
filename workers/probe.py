"""Checks a model or dataset in a separate process and prints what it found as JSON.

The web process never imports torch: registration runs ``python -m workers.probe``
in a subprocess with a time limit and reads one JSON object from its stdout:
``{"ok": true, ...}`` or ``{"ok": false, "message": ..., "details": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dissect_core.broden import MAX_IMAGE_PIXELS


def probe_model(args: argparse.Namespace) -> dict:
    from dissect_core.models import list_layers, load_model

    if args.kind == "generator":
        return probe_generator(args)
    loaded = load_model(
        args.arch,
        Path(args.weights),
        args.num_classes,
        input_size=args.input_size,
        mean=args.mean,
        std=args.std,
    )
    problems: dict[str, str] = {}
    layers = _layer_rows(list_layers(loaded, problems=problems))
    if args.kind == "segmenter":
        problem = _segmenter_problem(loaded, args.num_classes)
        if problem:
            return {"ok": False, "message": problem, "details": {}}
    return {
        "ok": True,
        "num_classes": loaded.num_classes,
        "input_size": list(loaded.input_size),
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "layers": layers,
        "layer_problems": problems,
    }


def _layer_rows(infos) -> list[dict]:
    """One JSON row per dissectable layer: its name, type, units, map size and layout."""
    return [
        {
            "name": info.name,
            "type": info.type,
            "units": info.units,
            "height": info.height,
            "width": info.width,
            **info.layout.as_dict(),
            "description": info.layout.describe(),
        }
        for info in infos
    ]


def probe_generator(args: argparse.Namespace) -> dict:
    from dissect_core.generators import load_generator
    from dissect_core.models import list_layers

    loaded = load_generator(
        args.arch, Path(args.weights), latent_dim=args.latent_dim, output_range=tuple(args.output_range)
    )
    return {
        "ok": True,
        "num_classes": None,
        "latent_dim": loaded.latent_dim,
        "layers": _layer_rows(list_layers(loaded)),
    }


def _segmenter_problem(loaded, labels: int | None) -> str:
    """Why a segmenter's output does not fit its labels ("" when it does)."""
    import torch

    h, w = loaded.input_size
    with torch.no_grad():
        out = loaded.module(torch.zeros(1, 3, h, w))
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return f"a segmenter must output per-pixel scores [B, classes, h, w]; this one outputs {shape}"
    if labels is not None and out.shape[1] != labels:
        return f"the segmenter outputs {out.shape[1]} classes per pixel but {labels} labels were given"
    return ""


def probe_dataset(args: argparse.Namespace) -> dict:
    from dissect_core.datasets import open_dataset

    dataset = open_dataset(args.spec, colors=args.colors)
    validate = getattr(dataset, "validate", None)
    if callable(validate):
        validate(full=False)
    oversized = _first_oversized_image(Path(args.spec.split(":", 1)[1]))
    if oversized is not None:
        path, why = oversized
        return {"ok": False, "message": f"{path.name} {why}", "details": {"path": str(path)}}
    if len(dataset) == 0:
        return {"ok": False, "message": "the dataset holds no images", "details": {}}
    return {
        "ok": True,
        "image_count": len(dataset),
        "image_size": list(dataset.image_size),
        "mask_size": list(dataset.mask_size),
        "categories": list(dataset.categories),
        "concepts": [{"name": c.name, "category": c.category} for c in dataset.concepts],
        "classes": list(getattr(dataset, "classes", []) or []),
    }


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _first_oversized_image(root: Path) -> tuple[Path, str] | None:
    """Read every image's header (no decoding) and return the first over the pixel limit."""
    import warnings

    from PIL import Image

    if not root.is_dir():
        return None
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as image:
                    width, height = image.size
        except Image.DecompressionBombError:
            return path, f"is over the limit of {MAX_IMAGE_PIXELS} pixels (a decompression bomb)"
        except OSError:
            continue
        if width * height > MAX_IMAGE_PIXELS:
            return path, f"is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.probe")
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model")
    m.add_argument("--arch", required=True)
    m.add_argument("--weights", required=True)
    m.add_argument("--num-classes", type=int, default=None)
    m.add_argument("--input-size", type=int, default=None)
    m.add_argument("--mean", type=float, nargs=3, default=None)
    m.add_argument("--std", type=float, nargs=3, default=None)
    m.add_argument("--kind", choices=["classifier", "generator", "segmenter"], default="classifier")
    m.add_argument("--latent-dim", type=int, default=None)
    m.add_argument("--output-range", type=float, nargs=2, default=[-1.0, 1.0])
    d = sub.add_parser("dataset")
    d.add_argument("--spec", required=True)
    d.add_argument("--colors", action="store_true")
    args = parser.parse_args(argv)

    from dissect_core.errors import DissectError

    try:
        result = probe_model(args) if args.what == "model" else probe_dataset(args)
    except DissectError as exc:
        result = {"ok": False, "message": exc.message, "details": _jsonable(exc.details)}
    except Exception as exc:  # a file that breaks a loader in an unforeseen way is still bad input
        result = {"ok": False, "message": f"{type(exc).__name__}: {exc}", "details": {}}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _jsonable(details: dict) -> dict:
    return json.loads(json.dumps(details, default=str))


if __name__ == "__main__":
    sys.exit(main())

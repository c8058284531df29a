"""Registering models and datasets (checked in a subprocess: torch never loads in the web
process), and API tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.db import transaction

from api.errors import ApplicationError
from api.models import Dataset, NetworkModel
from api.storage import extract_archive, new_upload_dir, path_in_data_roots, remove_tree, save_upload

PROBE_TIMEOUT_SECONDS = int(os.environ.get("PROBE_TIMEOUT_SECONDS", 300))


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".zip")
EXPORTED_SUFFIXES = (".pt2",)


def _run_probe(args: list[str]) -> dict:
    """Run ``python -m workers.probe`` (torch never loads in the web process)."""
    env = {**os.environ, "PYTHONPATH": str(settings.BASE_DIR)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workers.probe", *args],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_SECONDS,
            cwd=settings.BASE_DIR,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise ApplicationError(f"checking the input took longer than {PROBE_TIMEOUT_SECONDS} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ApplicationError(f"the input could not be checked: {tail[0]}", status=400)
    return json.loads(lines[-1])


def _check_kind_fields(kind, arch, classes, categories, latent_dim, output_range) -> list[str]:
    """Check the fields that only some kinds of model take; returns the segmenter's categories."""
    if kind != NetworkModel.Kind.GENERATOR and (latent_dim is not None or output_range):
        raise ApplicationError("latent_dim and output_range are for generators (kind=generator)")
    if kind == NetworkModel.Kind.GENERATOR:
        if arch == "torchscript" and latent_dim is None:
            raise ApplicationError("a TorchScript generator needs latent_dim")
        if output_range is not None and (len(output_range) != 2 or not output_range[0] < output_range[1]):
            raise ApplicationError("output_range must be [low, high] with low < high")
    if kind != NetworkModel.Kind.SEGMENTER:
        if categories:
            raise ApplicationError("categories are for segmenters (kind=segmenter)")
        return []
    if not classes or len(classes) < 2:
        raise ApplicationError("a segmenter needs classes: its label names, index 0 the background, then 1+ concepts")
    if len(set(classes)) != len(classes):
        raise ApplicationError("a segmenter's classes must be distinct names")
    cats = list(categories or ["object"])
    if len(cats) == 1:
        cats = ["-"] + cats * (len(classes) - 1)
    if len(cats) != len(classes):
        raise ApplicationError(f"give one category for all classes or one per class ({len(classes)}), not {len(cats)}")
    return cats


@transaction.atomic
def model_register(
    *,
    owner,
    name: str,
    arch: str,
    kind: str = NetworkModel.Kind.CLASSIFIER,
    num_classes: int | None = None,
    input_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    weights_file=None,
    weights_path: str | None = None,
    public: bool = False,
    classes: list[str] | None = None,
    categories: list[str] | None = None,
    latent_dim: int | None = None,
    output_range: list[float] | None = None,
) -> NetworkModel:
    """Register a network after checking, in a subprocess, that its weights load into ``arch``.

    Generators (``kind="generator"``) take ``latent_dim`` (inferred from built-in weights when
    omitted, required for TorchScript) and produce images in ``output_range`` (default [-1, 1]).
    Segmenters (``kind="segmenter"``) need ``classes``: their per-pixel labels, index 0 the
    background, and optionally ``categories`` (one per class, or one for all; default object).
    """
    if (weights_file is None) == (not weights_path):
        raise ApplicationError("give exactly one of weights (an uploaded file) or weights_path")
    categories = _check_kind_fields(kind, arch, classes, categories, latent_dim, output_range)
    folder = None
    try:
        if weights_file is not None:
            filename = Path(weights_file.name).name
            suffixes = {"torchscript": TORCHSCRIPT_SUFFIXES, "exported": EXPORTED_SUFFIXES}.get(arch, WEIGHT_SUFFIXES)
            if not filename.lower().endswith(suffixes):
                raise ApplicationError(f"weights file {filename!r} must end in one of {', '.join(suffixes)}")
            folder = new_upload_dir("models")
            path = save_upload(weights_file, folder, filename)
        else:
            path = path_in_data_roots(weights_path)
            if not path.is_file():
                raise ApplicationError(f"weights_path {weights_path} is not a file")
        args = ["model", "--arch", arch, "--weights", str(path)]
        if num_classes is not None:
            args += ["--num-classes", str(num_classes)]
        if input_size is not None:
            args += ["--input-size", str(input_size)]
        if mean:
            args += ["--mean", *map(str, mean)]
        if std:
            args += ["--std", *map(str, std)]
        args += ["--kind", kind]
        if kind == NetworkModel.Kind.GENERATOR:
            if latent_dim is not None:
                args += ["--latent-dim", str(latent_dim)]
            args += ["--output-range", *map(str, output_range or [-1.0, 1.0])]
        if kind == NetworkModel.Kind.SEGMENTER:
            args += ["--num-classes", str(len(classes))] if num_classes is None else []
        found = _run_probe(args)
        if not found.get("ok"):
            raise ApplicationError(f"weights do not load: {found.get('message')}", extra=found.get("details") or {})
        return NetworkModel.objects.create(
            owner=owner,
            name=name,
            arch=arch,
            kind=kind,
            num_classes=found.get("num_classes") or num_classes,
            input_size=input_size or (found.get("input_size") or [224])[0],
            mean=list(mean or found.get("mean") or [0.485, 0.456, 0.406]),
            std=list(std or found.get("std") or [0.229, 0.224, 0.225]),
            weights_path=str(path),
            classes=list(classes or []),
            categories=categories,
            latent_dim=found.get("latent_dim") if kind == NetworkModel.Kind.GENERATOR else None,
            output_range=list(output_range or [-1.0, 1.0]) if kind == NetworkModel.Kind.GENERATOR else [],
            layers=found["layers"],
            layer_problems=found.get("layer_problems") or {},
            public=public,
        )
    except BaseException:
        remove_tree(folder)
        raise


@transaction.atomic
def dataset_register(
    *,
    owner,
    name: str,
    format: str,
    path: str | None = None,
    archive=None,
    concepts: str = "masks",
    public: bool = False,
) -> Dataset:
    """Register a dataset after opening and checking it in a subprocess."""
    if (archive is None) == (not path):
        raise ApplicationError("give exactly one of path (inside DATA_ROOTS) or archive (an uploaded file)")
    if concepts not in ("masks", "colors"):
        raise ApplicationError(f"concepts must be 'masks' or 'colors', not {concepts!r}")
    folder = None
    try:
        if archive is not None:
            folder = new_upload_dir("datasets")
            saved = save_upload(archive, folder, Path(archive.name).name)
            root = extract_archive(saved, folder / "data")
            saved.unlink()
        else:
            root = path_in_data_roots(path)
            if not root.is_dir():
                raise ApplicationError(f"path {path} is not a directory")
        scheme = "broden" if format in ("broden", "synthetic") else format
        args = ["dataset", "--spec", f"{scheme}:{root}"]
        if concepts == "colors":
            args.append("--colors")
        found = _run_probe(args)
        if not found.get("ok"):
            raise ApplicationError(f"dataset is not valid: {found.get('message')}", extra=found.get("details") or {})
        dataset = Dataset.objects.create(
            owner=owner,
            name=name,
            format=format,
            path=str(root),
            concepts_source=concepts,
            image_count=found["image_count"],
            image_size=found["image_size"],
            mask_size=found["mask_size"],
            categories=found["categories"],
            concept_count=len(found["concepts"]),
            classes=found.get("classes", []),
            public=public,
        )
        return dataset
    except BaseException:
        remove_tree(folder)
        raise


def token_get_or_create(*, user) -> str:
    """The user's API token key (created on first use)."""
    from rest_framework.authtoken.models import Token

    token, _ = Token.objects.get_or_create(user=user)
    return token.key

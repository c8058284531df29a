"""Write paths. Every change to models, datasets, jobs and results goes through here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max
from django.utils import timezone

from api.errors import ApplicationError
from api.models import (
    DETECTOR_MIN_IOU,
    Concept,
    ConceptStat,
    Dataset,
    Job,
    LayerResult,
    NetworkModel,
    Unit,
    UnitConcept,
    WorkerHeartbeat,
)
from api.storage import (
    extract_archive,
    new_upload_dir,
    path_in_data_roots,
    remove_tree,
    save_upload,
)

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_SECONDS = int(os.environ.get("PROBE_TIMEOUT_SECONDS", 300))
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".zip")


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
            suffixes = TORCHSCRIPT_SUFFIXES if arch == "torchscript" else WEIGHT_SUFFIXES
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
            input_size=input_size or 224,
            mean=list(mean or [0.485, 0.456, 0.406]),
            std=list(std or [0.229, 0.224, 0.225]),
            weights_path=str(path),
            classes=list(classes or []),
            categories=categories,
            latent_dim=found.get("latent_dim") if kind == NetworkModel.Kind.GENERATOR else None,
            output_range=list(output_range or [-1.0, 1.0]) if kind == NetworkModel.Kind.GENERATOR else [],
            layers=found["layers"],
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


def _validate_dissect_params(model: NetworkModel, params: dict[str, Any]) -> dict[str, Any]:
    known = {"layers", "quantile", "batch_size", "max_images", "top_k_images", "shard_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApplicationError(f"unknown params: {', '.join(unknown)}", extra={"allowed": sorted(known)})
    layer_names = [entry["name"] for entry in model.layers]
    layers = params.get("layers")
    if not layers:
        convs = [entry["name"] for entry in model.layers if entry.get("type") == "Conv2d"]
        layers = [convs[-1] if convs else layer_names[-1]]
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ApplicationError("params.layers must be a list of layer names")
    missing = [x for x in layers if x not in layer_names]
    if missing:
        raise ApplicationError(
            f"unknown layer(s) {', '.join(missing)} for model {model.name}", extra={"valid": layer_names}
        )
    quantile = params.get("quantile", 0.99)
    if not isinstance(quantile, (int, float)) or not 0.0 < float(quantile) < 1.0:
        raise ApplicationError("params.quantile must be a number strictly between 0 and 1")
    batch_size = params.get("batch_size", settings.DISSECT_BATCH_SIZE)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= 1024:
        raise ApplicationError("params.batch_size must be an integer in 1..1024")
    out = {"layers": layers, "quantile": float(quantile), "batch_size": batch_size}
    if "max_images" in params:
        if not isinstance(params["max_images"], int) or params["max_images"] < 1:
            raise ApplicationError("params.max_images must be a positive integer")
        out["max_images"] = params["max_images"]
    if "shard_size" in params:
        if not isinstance(params["shard_size"], int) or params["shard_size"] < 1:
            raise ApplicationError("params.shard_size must be a positive integer (images per shard)")
        out["shard_size"] = params["shard_size"]
    if "top_k_images" in params:
        if not isinstance(params["top_k_images"], int) or not 0 <= params["top_k_images"] <= 50:
            raise ApplicationError("params.top_k_images must be an integer in 0..50")
        out["top_k_images"] = params["top_k_images"]
    return out


def _validate_ablate_params(model: NetworkModel, dataset: Dataset, params: dict[str, Any]) -> dict[str, Any]:
    known = {"layer", "ks", "classes", "train_split", "val_split", "max_images", "batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApplicationError(f"unknown params: {', '.join(unknown)}", extra={"allowed": sorted(known)})
    if model.kind != NetworkModel.Kind.CLASSIFIER:
        raise ApplicationError(f"ablate needs a classifier; model {model.name} is a {model.kind}")
    if not dataset.classes:
        raise ApplicationError(f"ablate needs a dataset with class labels; dataset {dataset.name} has none")
    layer_names = [entry["name"] for entry in model.layers]
    layer = params.get("layer")
    if not isinstance(layer, str) or layer not in layer_names:
        raise ApplicationError(
            f"params.layer must be one layer of model {model.name}, not {layer!r}", extra={"valid": layer_names}
        )
    out: dict[str, Any] = {
        "layer": layer,
        "train_split": params.get("train_split", "train"),
        "val_split": params.get("val_split", "val"),
        "batch_size": params.get("batch_size", 64),
    }
    for key in ("train_split", "val_split"):
        if not isinstance(out[key], str) or not out[key]:
            raise ApplicationError(f"params.{key} must be a split name (a value of the dataset's split column)")
    if not isinstance(out["batch_size"], int) or not 1 <= out["batch_size"] <= 1024:
        raise ApplicationError("params.batch_size must be an integer in 1..1024")
    ks = params.get("ks")
    if ks is not None:
        if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and k > 0 for k in ks):
            raise ApplicationError("params.ks must be a list of positive integers (set sizes)")
        out["ks"] = sorted(set(ks))
    classes = params.get("classes")
    if classes is not None:
        n = len(dataset.classes)
        if not isinstance(classes, list) or not all(isinstance(c, int) and 0 <= c < n for c in classes):
            raise ApplicationError(f"params.classes must be a list of class indices in 0..{n - 1}")
        out["classes"] = sorted(set(classes))
    if "max_images" in params:
        if not isinstance(params["max_images"], int) or params["max_images"] < 1:
            raise ApplicationError("params.max_images must be a positive integer")
        out["max_images"] = params["max_images"]
    return out


def _validate_attack_params(owner, model: NetworkModel, dataset: Dataset, params: dict[str, Any]) -> dict[str, Any]:
    known = {"layer", "split", "max_images", "eps", "iterations", "top_k", "seed", "batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApplicationError(f"unknown params: {', '.join(unknown)}", extra={"allowed": sorted(known)})
    if not dataset.classes:
        raise ApplicationError(f"attack needs a dataset with class labels; dataset {dataset.name} has none")
    layer = params.get("layer")
    ablation = (
        Job.objects.filter(owner=owner, model=model, type=Job.Type.ABLATE, status=Job.Status.SUCCEEDED,
                           params__layer=layer)
        .order_by("-finished", "-id")
        .first()
    )
    if not isinstance(layer, str) or ablation is None:
        raise ApplicationError(
            f"params.layer must be a layer of model {model.name} with a succeeded ablate job "
            f"(the attack compares unit changes with unit importance); got {layer!r}"
        )
    out: dict[str, Any] = {
        "layer": layer,
        "ablation_job": ablation.pk,
        "split": params.get("split", "val"),
        "max_images": params.get("max_images", 200),
        "eps": params.get("eps", 8 / 255),
        "iterations": params.get("iterations", 20),
        "top_k": params.get("top_k", 4),
        "seed": params.get("seed", 0),
        "batch_size": params.get("batch_size", 32),
    }
    checks = [
        (isinstance(out["split"], str) and out["split"], "params.split must be a split name"),
        (isinstance(out["max_images"], int) and out["max_images"] >= 1, "params.max_images must be a positive integer"),
        (isinstance(out["eps"], (int, float)) and 0 < out["eps"] <= 1, "params.eps must be in (0, 1] (pixel scale)"),
        (isinstance(out["iterations"], int) and 1 <= out["iterations"] <= 1000, "params.iterations must be in 1..1000"),
        (isinstance(out["top_k"], int) and out["top_k"] >= 1, "params.top_k must be a positive integer"),
        (isinstance(out["seed"], int), "params.seed must be an integer"),
        (isinstance(out["batch_size"], int) and 1 <= out["batch_size"] <= 1024, "params.batch_size must be in 1..1024"),
    ]
    for ok, message in checks:
        if not ok:
            raise ApplicationError(message)
    return out


def _validate_unit_classifier_params(model: NetworkModel, params: dict[str, Any]) -> dict[str, Any]:
    known = {"layer", "unit", "concept", "split", "max_images", "batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApplicationError(f"unknown params: {', '.join(unknown)}", extra={"allowed": sorted(known)})
    layers = {entry["name"]: entry for entry in model.layers}
    layer = params.get("layer")
    if layer not in layers:
        raise ApplicationError(f"params.layer must be a layer of model {model.name}, not {layer!r}",
                               extra={"valid": list(layers)})
    unit = params.get("unit")
    if not isinstance(unit, int) or not 0 <= unit < layers[layer]["units"]:
        raise ApplicationError(f"params.unit must be a unit of {layer}: 0..{layers[layer]['units'] - 1}")
    concept = params.get("concept")
    if not isinstance(concept, str) or not concept:
        raise ApplicationError("params.concept must be a concept name of the dataset")
    out: dict[str, Any] = {"layer": layer, "unit": unit, "concept": concept,
                           "batch_size": params.get("batch_size", settings.DISSECT_BATCH_SIZE)}
    if "split" in params:
        if not isinstance(params["split"], str):
            raise ApplicationError("params.split must be a split name")
        out["split"] = params["split"]
    if "max_images" in params:
        if not isinstance(params["max_images"], int) or params["max_images"] < 1:
            raise ApplicationError("params.max_images must be a positive integer")
        out["max_images"] = params["max_images"]
    if not isinstance(out["batch_size"], int) or not 1 <= out["batch_size"] <= 1024:
        raise ApplicationError("params.batch_size must be an integer in 1..1024")
    return out


GENERATOR_JOBS = (Job.Type.DISSECT, Job.Type.GENERATOR_REMOVE, Job.Type.GENERATOR_INSERT)


@transaction.atomic
def job_create(
    *, owner, type: str, model: NetworkModel, dataset: Dataset | None, params: dict[str, Any]
) -> Job:
    """Create a job and enqueue it once the transaction commits.

    Classifier (and segmenter) jobs run on a dataset. Generator jobs have none: they
    generate their images from seeded latents and label them with ``params.concepts``.
    """
    if type not in Job.Type.values:
        raise ApplicationError(f"job type {type!r} is not available; available: {', '.join(Job.Type.values)}")
    if not isinstance(params, dict):
        raise ApplicationError("params must be a JSON object")
    if _has_nul(params):
        raise ApplicationError("params must not contain NUL characters (\\u0000)")
    if model.kind == NetworkModel.Kind.GENERATOR:
        if type not in GENERATOR_JOBS:
            raise ApplicationError(
                f"model {model.name} is a generator; its job types are {', '.join(GENERATOR_JOBS)}"
            )
        if dataset is not None:
            raise ApplicationError(
                "generator jobs take no dataset: they generate their images and label them with params.concepts"
            )
    elif type in (Job.Type.GENERATOR_REMOVE, Job.Type.GENERATOR_INSERT):
        raise ApplicationError(f"{type} needs a generator; model {model.name} is a {model.kind}")
    elif dataset is None:
        raise ApplicationError(f"{type} jobs on a {model.kind} need a dataset")
    if model.kind == NetworkModel.Kind.GENERATOR:
        from api.generator_params import validate_generator_params

        clean = validate_generator_params(owner=owner, type=type, model=model, params=params)
    elif type == Job.Type.ABLATE:
        clean = _validate_ablate_params(model, dataset, params)
    elif type == Job.Type.ATTACK:
        clean = _validate_attack_params(owner, model, dataset, params)
    elif type == Job.Type.UNIT_CLASSIFIER:
        clean = _validate_unit_classifier_params(model, params)
    else:
        clean = _validate_dissect_params(model, params)
    job = Job.objects.create(owner=owner, type=type, model=model, dataset=dataset, params=clean)
    transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def _has_nul(value) -> bool:
    """Whether a JSON value holds a NUL character, which Postgres cannot store in jsonb."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _enqueue(job_id: int) -> None:
    """Send a queued job to the workers. When the broker cannot take it (Redis restarting), the
    job stays queued in Postgres and a worker's :func:`jobs_requeue_lost` sends it again."""
    from kombu.exceptions import OperationalError as BrokerError

    from workers.tasks import run_job

    try:
        run_job.apply_async(kwargs={"job_id": job_id})
    except BrokerError as exc:
        logger.warning("job %s stays queued until the broker is back: %s", job_id, exc)


@transaction.atomic
def job_cancel(*, job: Job) -> Job:
    """Cancel a queued or running job; the worker notices within seconds and stops."""
    job = Job.objects.select_for_update().get(pk=job.pk)
    if job.is_final:
        raise ApplicationError(f"job {job.pk} is already {job.status}", status=409)
    job.status = Job.Status.CANCELLED
    job.finished = timezone.now()
    job.phase = "cancelled"
    job.save(update_fields=["status", "finished", "phase"])
    _drop_results(job)
    return job


def _drop_results(job: Job) -> None:
    """Remove whatever a job wrote (rows now, files once the transaction commits)."""
    import shutil

    from api.models import AblationCurve, ClassUnitImportance

    Unit.objects.filter(job=job).delete()
    LayerResult.objects.filter(job=job).delete()
    ClassUnitImportance.objects.filter(job=job).delete()
    AblationCurve.objects.filter(job=job).delete()
    for folder in _job_folders(job.pk):
        transaction.on_commit(lambda f=folder: shutil.rmtree(f, ignore_errors=True))


def _job_folders(job_id: int) -> list[Path]:
    media = Path(settings.MEDIA_ROOT)
    return [media / "results" / f"job-{job_id}", media / "work" / f"job-{job_id}"]


def job_leftovers_remove(*, job_id: int) -> bool:
    """Remove the files of a failed or cancelled job that its worker wrote after the job stopped.

    A worker notices a cancel at its next batch, after ``_drop_results`` removed the job's
    folders, and may write a file or two before that (a matrix, unit images, shard state).
    The task calls this when it ends. Returns True when the job is failed or cancelled.
    """
    import shutil

    status = Job.objects.filter(pk=job_id).values_list("status", flat=True).first()
    if status not in (Job.Status.FAILED, Job.Status.CANCELLED):
        return False
    for folder in _job_folders(job_id):
        shutil.rmtree(folder, ignore_errors=True)
    return True


@transaction.atomic
def job_start(*, job_id: int, worker: str) -> Job | None:
    """Mark a job running for this worker.

    Returns None (nothing to do) when the job is final, or running elsewhere with a
    fresh heartbeat; a running job whose heartbeat is stale is taken over.
    """
    job = Job.objects.select_for_update().get(pk=job_id)
    if job.is_final:
        return None
    now = timezone.now()
    if job.status == Job.Status.RUNNING and job.heartbeat and (now - job.heartbeat).total_seconds() < settings.JOB_STALE_SECONDS:
        return None
    job.status = Job.Status.RUNNING
    job.started = job.started or now
    job.heartbeat = now
    job.attempts += 1
    job.worker = worker
    job.phase = "starting"
    job.error = ""
    job.save(update_fields=["status", "started", "heartbeat", "attempts", "worker", "phase", "error"])
    return job


def job_progress(*, job_id: int, phase: str, done: int, total: int, fraction: float) -> str:
    """Record progress and a heartbeat; returns the job's status (the worker stops if cancelled)."""
    now = timezone.now()
    job = Job.objects.only("status", "started").get(pk=job_id)
    if job.status != Job.Status.RUNNING:
        return job.status
    eta = None
    if job.started and fraction > 0.01:
        elapsed = (now - job.started).total_seconds()
        eta = max(0.0, elapsed * (1.0 - fraction) / fraction)
    Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).update(
        phase=phase,
        images_done=done,
        images_total=total,
        progress=min(1.0, max(0.0, fraction)),
        eta_seconds=eta,
        heartbeat=now,
    )
    return job.status


@transaction.atomic
def job_succeed(*, job_id: int, results_path: str = "") -> Job | None:
    job = Job.objects.select_for_update().get(pk=job_id)
    if job.status != Job.Status.RUNNING:
        return None
    job.status = Job.Status.SUCCEEDED
    job.progress = 1.0
    job.phase = "done"
    job.eta_seconds = 0.0
    job.finished = timezone.now()
    job.results_path = results_path
    # Progress reports are throttled and per stage, so the last one can be short ("192 / 614").
    job.images_done = job.images_total
    job.save(update_fields=["status", "progress", "phase", "eta_seconds", "finished", "results_path",
                            "images_done"])
    if Unit.objects.filter(job=job).exists():
        concept_stats_refresh(model_id=job.model_id)
    return job


@transaction.atomic
def job_fail(*, job_id: int, message: str) -> Job | None:
    """Fail a job with a reason and drop any results it wrote."""
    job = Job.objects.select_for_update().get(pk=job_id)
    if job.is_final:
        return None
    job.status = Job.Status.FAILED
    job.error = message[:20000]
    job.phase = "failed"
    job.finished = timezone.now()
    job.save(update_fields=["status", "error", "phase", "finished"])
    _drop_results(job)
    return job


@transaction.atomic
def concept_stats_refresh(*, model_id: int) -> int:
    """Recompute one model's ConceptStat rows from its units: per label and job owner, the units of
    succeeded jobs with iou >= DETECTOR_MIN_IOU, and their best IoU.

    The model row is locked first (FOR NO KEY UPDATE: jobs and units referencing it can still
    be written), so two jobs of the same model finishing together rewrite its rows one after the
    other; the second sees the first's status once it has the lock.

    Returns:
        the number of rows written (0 when the model no longer exists).
    """
    locked = list(NetworkModel.objects.select_for_update(no_key=True).filter(pk=model_id).values_list("pk", flat=True))
    if not locked:
        return 0
    ConceptStat.objects.filter(model_id=model_id).delete()
    rows = (
        Unit.objects.filter(
            model_id=model_id, job__status=Job.Status.SUCCEEDED, label__isnull=False, iou__gte=DETECTOR_MIN_IOU
        )
        .order_by()
        .values_list("label_id", "job__owner_id")
        .annotate(units=Count("id"), best_iou=Max("iou"))
    )
    created = ConceptStat.objects.bulk_create(
        [
            ConceptStat(concept_id=label, model_id=model_id, owner_id=owner, units=units, best_iou=best)
            for label, owner, units, best in rows
        ],
        batch_size=5000,
    )
    return len(created)


def concepts_ensure(*, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], Concept]:
    """Get or create concepts by (name, category) in bulk (one query when they all exist)."""
    wanted = set(pairs)
    found = {(c.name, c.category): c for c in Concept.objects.filter(name__in={n for n, _ in wanted})}
    missing = wanted - found.keys()
    if missing:
        Concept.objects.bulk_create(
            [Concept(name=n, category=c) for n, c in missing], ignore_conflicts=True, batch_size=2000
        )
        for concept in Concept.objects.filter(name__in={n for n, _ in missing}):
            found.setdefault((concept.name, concept.category), concept)
    return found


def _top_concepts(iou: np.ndarray, k: int) -> np.ndarray:
    """Column indices [U, min(k, C)] of each row's k highest IoUs, best first, ties to the lower
    column: the first k of a stable argsort of -iou, without sorting every row."""
    units_count, n_concepts = iou.shape
    k = min(k, n_concepts)
    if k == 0:
        return np.zeros((units_count, 0), dtype=np.intp)
    neg = -iou
    if n_concepts <= 4 * k or np.isnan(neg).any():
        return np.argsort(neg, axis=1, kind="stable")[:, :k]
    kth = np.partition(neg, k - 1, axis=1)[:, k - 1 : k]
    rows, cols = np.nonzero(neg <= kth)
    order = np.lexsort((cols, neg[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    starts = np.searchsorted(rows, np.arange(units_count))
    return cols[starts[:, None] + np.arange(k)]


def _copy_text(value: str) -> str:
    """A value for Postgres COPY text format (tab-separated, backslash escapes)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy_into(cursor, model, fields: list[str], lines: list[str]) -> None:
    import io

    ops = transaction.get_connection().ops
    table = ops.quote_name(model._meta.db_table)
    columns = ", ".join(ops.quote_name(model._meta.get_field(f).column) for f in fields)
    cursor.cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(lines)))


def _store_units_copy(*, job: Job, layer: str, label_ids: list, label_names: list[str], best_iou: list[float],
                      thresholds: list[float], top_images: list[str], score_concepts: np.ndarray,
                      score_iou: np.ndarray) -> None:
    """Postgres: the layer's units and scores by two COPYs, unit ids drawn from the sequence first."""
    units_count = len(label_ids)
    with transaction.get_connection().cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
            [Unit._meta.db_table, Unit._meta.pk.column, units_count],
        )
        ids = [row[0] for row in cursor.fetchall()]
        prefix = f"\t{job.pk}\t{job.model_id}\t{_copy_text(layer)}\t"
        labels = [
            "\\N\t" if label is None else f"{label}\t{_copy_text(name)}"
            for label, name in zip(label_ids, label_names, strict=True)
        ]
        _copy_into(
            cursor,
            Unit,
            ["id", "job", "model", "layer", "unit", "label", "label_name", "iou", "threshold", "top_images"],
            [
                f"{ids[u]}{prefix}{u}\t{labels[u]}\t{best_iou[u]!r}\t{thresholds[u]!r}\t{top_images[u]}\n"
                for u in range(units_count)
            ],
        )
        concepts = score_concepts.tolist()
        ious = score_iou.tolist()
        _copy_into(
            cursor,
            UnitConcept,
            ["unit", "concept", "rank", "iou"],
            [
                f"{ids[u]}\t{concept}\t{rank}\t{ious[u][rank]!r}\n"
                for u in range(units_count)
                for rank, concept in enumerate(concepts[u])
            ],
        )


def _store_units_orm(*, job: Job, layer: str, label_ids: list, label_names: list[str], best_iou: list[float],
                     thresholds: list[float], top_images: list[list[int]], score_concepts: np.ndarray,
                     score_iou: np.ndarray) -> None:
    """Other databases (the embedded SQLite): batched bulk_create."""
    Unit.objects.bulk_create(
        [
            Unit(job=job, model_id=job.model_id, layer=layer, unit=u, label_id=label_ids[u],
                 label_name=label_names[u], iou=best_iou[u], threshold=thresholds[u], top_images=top_images[u])
            for u in range(len(label_ids))
        ],
        batch_size=2000,
    )
    unit_ids = dict(Unit.objects.filter(job=job, layer=layer).values_list("unit", "id"))
    concepts = score_concepts.tolist()
    ious = score_iou.tolist()
    UnitConcept.objects.bulk_create(
        [
            UnitConcept(unit_id=unit_ids[u], concept_id=concept, rank=rank, iou=ious[u][rank])
            for u in range(len(label_ids))
            for rank, concept in enumerate(concepts[u])
        ],
        batch_size=5000,
    )


def layer_result_store(
    *,
    job: Job,
    layer: str,
    thresholds: np.ndarray,
    iou: np.ndarray,
    concepts: list[tuple[str, str]],
    summary: dict,
    top_images: list[list[int]] | None = None,
) -> int:
    """Write one layer's units, top-K concept scores and IoU matrix file, idempotently.

    In one transaction, with the job row locked: the layer's earlier rows (a redelivered
    task) are deleted, then its units and their top-K scores are written in bulk (COPY on
    Postgres, batched bulk_create elsewhere) and its LayerResult is upserted. The matrix
    file is written first, to a temporary name renamed into place.

    Args:
        thresholds: float [U], t_u per unit.
        iou: float [U, C], IoU per unit and concept (columns in ``concepts`` order).
        concepts: C pairs (name, category).
        top_images: U lists of image indices, or None.
    Returns:
        the number of units written (0 when the job is no longer running).
    """
    units_count, n_concepts = iou.shape
    if n_concepts != len(concepts) or thresholds.shape != (units_count,):
        raise ValueError("iou, thresholds and concepts disagree in shape")
    if top_images is not None and len(top_images) != units_count:
        raise ValueError("top_images must hold one list per unit")
    k = max(1, settings.UNIT_TOP_CONCEPTS)
    folder = Path(settings.MEDIA_ROOT) / "results" / f"job-{job.pk}"
    folder.mkdir(parents=True, exist_ok=True)
    matrix_path = folder / f"{layer}.npz"
    tmp = folder / f".{layer}.tmp.npz"
    np.savez_compressed(
        tmp,
        iou=iou.astype(np.float32),
        thresholds=thresholds.astype(np.float32),
        concept_names=np.array([n for n, _ in concepts]),
        concept_categories=np.array([c for _, c in concepts]),
    )
    os.replace(tmp, matrix_path)
    concept_rows = concepts_ensure(pairs=list(concepts))
    column_ids = np.array([concept_rows[pair].pk for pair in concepts], dtype=np.int64)
    order = _top_concepts(iou, k)
    if n_concepts:
        best = iou[np.arange(units_count), order[:, 0]]
        label_ids = [int(c) if b > 0 else None for c, b in zip(column_ids[order[:, 0]], best, strict=True)]
        label_names = [concepts[c][0] if b > 0 else "" for c, b in zip(order[:, 0], best, strict=True)]
    else:
        best = np.zeros(units_count)
        label_ids, label_names = [None] * units_count, [""] * units_count
    rows = {
        "label_ids": label_ids,
        "label_names": label_names,
        "best_iou": np.where(best > 0, best, 0.0).astype(float).tolist(),
        "thresholds": thresholds.astype(float).tolist(),
        "score_concepts": column_ids[order],
        "score_iou": np.take_along_axis(iou, order, axis=1).astype(float),
    }
    images = [[int(i) for i in row] for row in top_images] if top_images is not None else [[]] * units_count
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        if locked.status != Job.Status.RUNNING:
            return 0
        Unit.objects.filter(job=job, layer=layer).delete()
        if transaction.get_connection().vendor == "postgresql":
            _store_units_copy(job=job, layer=layer, top_images=[_copy_text(json.dumps(i)) for i in images], **rows)
        else:
            _store_units_orm(job=job, layer=layer, top_images=images, **rows)
        LayerResult.objects.update_or_create(
            job=job,
            layer=layer,
            defaults={"units": units_count, "summary": summary, "matrix_path": str(matrix_path)},
        )
    return units_count


def worker_heartbeat(*, hostname: str, pid: int, device: str, started) -> None:
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(
        hostname=hostname, defaults={"pid": pid, "device": device, "started": started, "last_seen": now}
    )


def worker_gone(*, hostname: str) -> None:
    WorkerHeartbeat.objects.filter(hostname=hostname).delete()


def jobs_recover_stale(*, older_than: timedelta, max_attempts: int) -> list[int]:
    """Requeue running jobs whose worker stopped sending heartbeats (it died); fail them after
    ``max_attempts`` tries. Safe to call from every worker at once (rows are skipped when locked).

    Returns:
        the ids of the jobs requeued or failed.
    """
    cutoff = timezone.now() - older_than
    touched: list[int] = []
    with transaction.atomic():
        stale = Job.objects.select_for_update(skip_locked=True).filter(
            status=Job.Status.RUNNING, heartbeat__lt=cutoff
        )
        for job in stale:
            touched.append(job.pk)
            reason = f"no heartbeat from worker {job.worker or '?'} for over {older_than.total_seconds():.0f} s"
            if job.attempts >= max_attempts:
                job.status = Job.Status.FAILED
                job.error = f"{reason}, after {job.attempts} attempts"
                job.phase = "failed"
                job.finished = timezone.now()
                job.save(update_fields=["status", "error", "phase", "finished"])
                _drop_results(job)
            else:
                job.status = Job.Status.QUEUED
                job.phase = "requeued"
                job.error = reason
                job.heartbeat = timezone.now()  # a queued job's heartbeat: when it was last enqueued
                job.save(update_fields=["status", "phase", "error", "heartbeat"])
                transaction.on_commit(lambda pk=job.pk: _enqueue(pk))
    return touched


def jobs_requeue_lost(*, older_than: timedelta) -> list[int]:
    """Enqueue again queued jobs whose message may be lost: the broker was down when they were
    created, Redis lost its last writes in a crash, or a killed worker held the message (a
    retry waiting for its countdown). A job runs once however many messages it has
    (:func:`job_start`), so resending is safe; it is spaced out exponentially (the wait since the
    last send must exceed ``older_than`` and the job's age at that send), so a job that is only
    waiting behind a long queue gets a few extra messages, not one per sweep.

    Returns:
        the ids of the jobs enqueued again.
    """
    from django.db.models import Q

    now = timezone.now()
    cutoff = now - older_than
    sent: list[int] = []
    with transaction.atomic():
        waiting = Job.objects.select_for_update(skip_locked=True).filter(
            Q(heartbeat__lt=cutoff) | Q(heartbeat__isnull=True, created__lt=cutoff), status=Job.Status.QUEUED
        )
        for job in waiting:
            last = job.heartbeat or job.created
            if now - last < last - job.created:
                continue
            job.heartbeat = now
            job.save(update_fields=["heartbeat"])
            sent.append(job.pk)
            transaction.on_commit(lambda pk=job.pk: _enqueue(pk))
    return sent


def shards_create(*, job: Job, stage: str, ranges: list[tuple[int, int]]) -> list[int]:
    """Open a stage of a sharded job: one pending shard per image range; enqueue them on commit.

    Returns:
        the shard indices created (existing ones are kept, so a replay is harmless).
    """
    from api.models import JobShard

    with transaction.atomic():
        Job.objects.filter(pk=job.pk).update(stage=stage)
        JobShard.objects.bulk_create(
            [JobShard(job=job, stage=stage, index=i, start=a, stop=b) for i, (a, b) in enumerate(ranges)],
            ignore_conflicts=True,
        )
        for i in range(len(ranges)):
            transaction.on_commit(lambda i=i: _enqueue_shard(job.pk, stage, i))
    return list(range(len(ranges)))


def _enqueue_shard(job_id: int, stage: str, index: int) -> None:
    from workers.tasks import run_shard

    run_shard.apply_async(kwargs={"job_id": job_id, "stage": stage, "index": index})


def shards_requeue_unfinished(*, job: Job) -> int:
    """Enqueue again every shard of the job's current stage that is not done."""
    from api.models import JobShard

    pending = list(
        JobShard.objects.filter(job=job, stage=job.stage).exclude(status=JobShard.Status.DONE).values_list("index", flat=True)
    )
    for index in pending:
        transaction.on_commit(lambda i=index: _enqueue_shard(job.pk, job.stage, i))
    return len(pending)


def shard_start(*, job_id: int, stage: str, index: int, worker: str):
    """Claim a shard. Returns (job, shard), or None when there is nothing to do (job final,
    another stage current, shard done) ; raises ``ShardBusy`` when another worker holds it
    with a fresh heartbeat."""
    from api.models import JobShard

    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        if job.is_final or job.stage != stage:
            return None
        shard = JobShard.objects.select_for_update().get(job=job, stage=stage, index=index)
        now = timezone.now()
        if shard.status == JobShard.Status.DONE:
            return None
        if (
            shard.status == JobShard.Status.RUNNING
            and shard.heartbeat
            and (now - shard.heartbeat).total_seconds() < settings.JOB_STALE_SECONDS
        ):
            raise ShardBusy(f"shard {index} of job {job_id} is running on {shard.worker}")
        shard.status = JobShard.Status.RUNNING
        shard.attempts += 1
        shard.worker = worker
        shard.heartbeat = now
        shard.images_done = 0
        shard.save(update_fields=["status", "attempts", "worker", "heartbeat", "images_done"])
        if job.status == Job.Status.QUEUED:
            job.status = Job.Status.RUNNING
            job.started = job.started or now
        job.heartbeat = now
        job.save(update_fields=["status", "started", "heartbeat"])
        return job, shard


class ShardBusy(Exception):
    """Another live worker holds the shard; try again later."""


def shard_progress(*, shard_id: int, done: int) -> str:
    """Record a shard's progress and heartbeat; update the job's; return the job's status."""
    from django.db.models import Sum

    from api.models import JobShard

    now = timezone.now()
    JobShard.objects.filter(pk=shard_id, status=JobShard.Status.RUNNING).update(images_done=done, heartbeat=now)
    shard = JobShard.objects.select_related("job").get(pk=shard_id)
    job = shard.job
    if job.status != Job.Status.RUNNING:
        return job.status
    shards = JobShard.objects.filter(job=job, stage=shard.stage)
    total = sum(s.stop - s.start for s in shards)
    done_all = shards.aggregate(n=Sum("images_done"))["n"] or 0
    start, end = SHARD_STAGE_SHARE.get(shard.stage.rstrip("0123456789"), (0.0, 0.95))
    fraction = start + (end - start) * (done_all / total if total else 1.0)
    eta = None
    if job.started and fraction > 0.01:
        elapsed = (now - job.started).total_seconds()
        eta = max(0.0, elapsed * (1.0 - fraction) / fraction)
    Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(
        phase=shard.stage, images_done=done_all, images_total=total, progress=fraction, eta_seconds=eta, heartbeat=now
    )
    return job.status


SHARD_STAGE_SHARE = {"quantile": (0.0, 0.45), "refine": (0.45, 0.55), "count": (0.55, 0.92), "finish": (0.92, 0.99)}


def shard_done(*, shard_id: int, path: str) -> bool:
    """Mark a shard done; True when it was the last of its stage (the caller advances the job)."""
    from api.models import JobShard

    with transaction.atomic():
        shard = JobShard.objects.select_for_update().get(pk=shard_id)
        job = Job.objects.select_for_update().get(pk=shard.job_id)
        if shard.status == JobShard.Status.DONE:
            return False
        shard.status = JobShard.Status.DONE
        shard.path = path
        shard.images_done = shard.stop - shard.start
        shard.heartbeat = timezone.now()
        shard.save(update_fields=["status", "path", "images_done", "heartbeat"])
        if job.is_final or job.stage != shard.stage:
            return False
        return not JobShard.objects.filter(job=job, stage=shard.stage).exclude(status=JobShard.Status.DONE).exists()


def shards_recover_stale(*, older_than: timedelta) -> list[int]:
    """Requeue shards whose worker stopped beating (the job itself may still look alive)."""
    from api.models import JobShard

    cutoff = timezone.now() - older_than
    requeued: list[int] = []
    with transaction.atomic():
        stale = JobShard.objects.select_for_update(skip_locked=True).filter(
            status=JobShard.Status.RUNNING, heartbeat__lt=cutoff, job__status=Job.Status.RUNNING
        )
        for shard in stale:
            shard.status = JobShard.Status.PENDING
            shard.save(update_fields=["status"])
            requeued.append(shard.pk)
            transaction.on_commit(lambda s=shard: _enqueue_shard(s.job_id, s.stage, s.index))
    return requeued


def _finite(value: float) -> float | None:
    import math

    return None if value is None or math.isnan(value) else float(value)


def ablation_store(*, job: Job, layer: str, importance_rows: list[dict], curve_rows: list[dict], summary: dict) -> None:
    """Write an ablate job's unit x class importance and set-ablation curves, idempotently."""
    from api.models import AblationCurve, ClassUnitImportance

    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        if locked.status != Job.Status.RUNNING:
            return
        ClassUnitImportance.objects.filter(job=job).delete()
        AblationCurve.objects.filter(job=job).delete()
        ClassUnitImportance.objects.bulk_create(
            [
                ClassUnitImportance(
                    job=job, model_id=job.model_id, layer=layer, class_index=row["class_index"],
                    class_name=row["class"], rank=row["rank"], unit=row["unit"],
                    balanced_accuracy=row["balanced_accuracy"], drop=row["drop"], margin_drop=row["margin_drop"],
                )
                for row in importance_rows
                if _finite(row["balanced_accuracy"]) is not None
            ],
            batch_size=5000,
        )
        AblationCurve.objects.bulk_create(
            [
                AblationCurve(
                    job=job, class_index=row["class_index"], class_name=row["class"], k=row["k"],
                    baseline=_finite(row["baseline"]), removed_top=_finite(row["removed_top"]),
                    kept_top=_finite(row["kept_top"]), removed_top_accuracy=row["removed_top_accuracy"],
                    kept_top_accuracy=row["kept_top_accuracy"],
                )
                for row in curve_rows
            ],
            batch_size=5000,
        )
        locked.summary = summary
        locked.save(update_fields=["summary"])


def job_summary_store(*, job: Job, summary: dict) -> None:
    """Attach a small result summary to a running job."""
    Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(summary=summary)


def token_get_or_create(*, user) -> str:
    """The user's API token key (created on first use)."""
    from rest_framework.authtoken.models import Token

    token, _ = Token.objects.get_or_create(user=user)
    return token.key


def generator_paint(
    *, user, model: NetworkModel, layer: str, concept: str, seed: int, index: int, mode: str,
    mask: list[list[int]], k: int = 20, quantile: float = 0.995, dissection: int | None = None,
) -> dict[str, Any]:
    """Add or erase a concept inside a mask of one generated image, on a worker (queue "interactive").

    Units: the ``k`` units of ``layer`` with the highest IoU for ``concept`` in a succeeded
    dissection (default: the latest). Returns {"before", "after" (PNG bytes), "units",
    "milliseconds" (worker time), "dissection"}.
    """
    import base64

    from celery.exceptions import TimeoutError as CeleryTimeout

    from api.generator_params import _concept, _dissection
    from workers.tasks import paint

    if model.kind != NetworkModel.Kind.GENERATOR:
        raise ApplicationError(f"model {model.name} is a {model.kind}; painting needs a generator")
    layers = {entry["name"]: entry for entry in model.layers}
    if layer not in layers:
        raise ApplicationError(f"unknown layer {layer!r} for model {model.name}", extra={"valid": list(layers)})
    if not 1 <= k <= layers[layer]["units"]:
        raise ApplicationError(f"k must be in 1..{layers[layer]['units']} (units of {layer})")
    job = _dissection(user, model, layer, dissection)
    _concept(job, layer, concept)
    result = paint.apply_async(kwargs=dict(
        model_id=model.pk, layer=layer, concept=concept, dissection=job.pk, k=k, quantile=quantile,
        seed=seed, index=index, mode=mode, mask=mask,
    ))
    try:
        out = result.get(timeout=settings.PAINT_TIMEOUT_SECONDS, propagate=True, disable_sync_subtasks=False)
    except CeleryTimeout:
        result.revoke()
        raise ApplicationError(
            f"no worker answered within {settings.PAINT_TIMEOUT_SECONDS:.0f} s (painting runs on a worker that "
            "consumes the 'interactive' queue; make serve starts one)", status=503,
        ) from None
    finally:
        result.forget()
    if "error" in out:
        raise ApplicationError(out["error"])
    return {"before": base64.b64decode(out["before"]), "after": base64.b64decode(out["after"]),
            "units": out["units"], "milliseconds": out["milliseconds"], "dissection": job.pk}

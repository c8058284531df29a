"""The body of an ablate job: which units each class depends on (the paper's Figure 2)."""

from __future__ import annotations

import math

import numpy as np
from django.conf import settings

from api import selectors, services
from api.job_params import AblateParams, AttackParams, UnitClassifierParams, params_of
from api.models import Job
from workers.dissection import pick_device, with_batch_backoff
from workers.generators import load_network
from workers.reporting import ProgressReporter


def _staged(reporter: ProgressReporter, stage: str):
    def progress(phase: str, done: int, total: int) -> None:
        reporter.progress(f"{stage}-{phase}", done, total)

    return progress


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def run_ablation(job: Job) -> None:
    from dissect_core.ablation import (
        ablate_sets,
        importance_interpretability,
        unit_importance,
    )
    from dissect_core.datasets import open_dataset

    params = params_of(job, AblateParams)
    row = job.model
    model = load_network(row)
    spec = job.dataset.spec
    train = open_dataset(spec, split=params.train_split, max_images=params.max_images)
    val = open_dataset(spec, split=params.val_split, max_images=params.max_images)
    layer = params.layer
    device = pick_device()
    with ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS) as reporter:
        reporter.progress("loading", 0, len(train))
        importance = with_batch_backoff(
            lambda batch_size: unit_importance(
                model,
                train,
                layer,
                batch_size=batch_size,
                device=device,
                progress=_staged(reporter, "importance"),
                should_stop=reporter.should_stop,
            ),
            params.batch_size,
        )
        sets = with_batch_backoff(
            lambda batch_size: ablate_sets(
                model,
                val,
                layer,
                importance,
                classes=params.classes,
                ks=params.ks,
                batch_size=batch_size,
                device=device,
                progress=_staged(reporter, "sets"),
                should_stop=reporter.should_stop,
            ),
            params.batch_size,
        )
        reporter.progress("storing", 1, 1)
        summary: dict = {
            "layer": layer,
            "train_images": len(train),
            "val_images": len(val),
            "classes": list(importance.classes),
            "baseline_train": {
                "accuracy": importance.baseline.accuracy,
                "balanced_accuracy": importance.baseline.balanced_accuracy.tolist(),
            },
            "baseline_val": {
                "accuracy": sets.baseline.accuracy,
                "balanced_accuracy": sets.baseline.balanced_accuracy.tolist(),
            },
            "tied_units": importance.tied.tolist(),
            "unchanged_units": importance.unchanged.tolist(),
            "sets_k20": sets.summary(20),
        }
        dissection = selectors.latest_unit_iou(model_id=row.pk, layer=layer)
        if dissection is not None and len(dissection[1]) == importance.balanced_accuracy.shape[0]:
            interp = importance_interpretability(importance, dissection[1])
            summary["interpretability"] = {
                "dissection_job": dissection[0],
                "units": interp.units.tolist(),
                "classes_in_top4": interp.classes_in_top.tolist(),
                "iou": interp.iou.tolist(),
                "correlation": interp.correlation(),
            }
        services.ablation_store(
            job=job,
            layer=layer,
            importance_rows=list(importance.rows()),
            curve_rows=list(sets.rows()),
            summary=_clean(summary),
        )
    services.job_succeed(job_id=job.pk)


def run_attack(job: Job) -> None:
    """Attack correctly classified images and compare unit changes with unit importance (Figure 5c)."""
    from dissect_core.attack import attack_unit_changes
    from dissect_core.datasets import open_dataset

    params = params_of(job, AttackParams)
    model = load_network(job.model)
    dataset = open_dataset(job.dataset.spec, split=params.split)
    ranking = selectors.importance_ranking(job_id=params.ablation_job)
    with ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS) as reporter:
        analysis = with_batch_backoff(
            lambda batch_size: attack_unit_changes(
                model,
                dataset,
                params.layer,
                ranking,
                top_k=params.top_k,
                eps=params.eps,
                iterations=params.iterations,
                max_images=params.max_images,
                seed=params.seed,
                batch_size=batch_size,
                device=pick_device(),
                progress=reporter.progress,
                should_stop=reporter.should_stop,
            ),
            params.batch_size,
        )
        summary = analysis.summary(confidence=0.99)
        summary.update({"layer": params.layer, "ablation_job": params.ablation_job, "eps": params.eps})
        services.job_summary_store(job=job, summary=_clean(summary))
    services.job_succeed(job_id=job.pk)


def _spread(values: np.ndarray, n: int = 1000) -> list[float]:
    """At most n values of a sorted array, evenly spaced (enough to draw its distribution)."""
    if len(values) <= n:
        return [float(v) for v in values]
    return [float(values[int(i)]) for i in np.linspace(0, len(values) - 1, n)]


def run_unit_classifier(job: Job) -> None:
    """A unit as a classifier of a concept: the best threshold on its peak activation (Figure 1f)."""
    from dissect_core.datasets import open_dataset
    from dissect_core.errors import DissectError
    from dissect_core.unit_classifier import concept_presence, image_peaks, unit_classifier

    params = params_of(job, UnitClassifierParams)
    model = load_network(job.model)
    dataset = open_dataset(
        job.dataset.spec,
        split=params.split,
        max_images=params.max_images,
        colors=job.dataset.concepts_source == "colors",
    )
    numbers = {c.name: c.number for c in dataset.concepts}
    if params.concept not in numbers:
        raise DissectError(f"dataset {job.dataset.name} has no concept {params.concept!r}")
    with ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS) as reporter:
        peaks = with_batch_backoff(
            lambda batch_size: image_peaks(
                model,
                dataset,
                [params.layer],
                batch_size=batch_size,
                device=pick_device(),
                progress=reporter.progress,
                should_stop=reporter.should_stop,
            ),
            params.batch_size,
        )[params.layer][:, params.unit]
        present = concept_presence(dataset)[:, numbers[params.concept]]
        try:
            result = unit_classifier(peaks, present)
        except ValueError as exc:
            raise DissectError(f"cannot score unit {params.unit} on {params.concept!r}: {exc}") from exc
        summary = {
            "layer": params.layer,
            "unit": params.unit,
            "concept": params.concept,
            "threshold": result.threshold,
            "balanced_accuracy": result.balanced_accuracy,
            "true_positive_rate": result.true_positive_rate,
            "true_negative_rate": result.true_negative_rate,
            "images_with": len(result.positive_peaks),
            "images_without": len(result.negative_peaks),
            "peaks_with": _spread(result.positive_peaks),
            "peaks_without": _spread(result.negative_peaks),
        }
        services.job_summary_store(job=job, summary=_clean(summary))
    services.job_succeed(job_id=job.pk)

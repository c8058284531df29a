"""The body of a dissection job: dissect_core does the work, api.services stores it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from django.conf import settings
from django.db import transaction

from api import services
from api.job_params import DissectBase, params_of
from api.models import Job
from workers.reporting import ProgressReporter

logger = logging.getLogger(__name__)
T = TypeVar("T")


def pick_device() -> str:
    import torch

    wanted = settings.WORKER_DEVICE
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def with_batch_backoff(run: Callable[[int], T], batch_size: int) -> T:
    """Call ``run(batch_size)``; on an out-of-memory error halve the batch and try again (down to 1)."""
    import torch

    while True:
        try:
            return run(batch_size)
        except Exception as exc:
            if not is_out_of_memory(exc) or batch_size == 1:
                raise
            logger.warning("out of memory at batch size %d; retrying with %d", batch_size, batch_size // 2)
            batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_dissection(job: Job) -> None:
    """Run a dissection job: in this task when it fits one shard, else fanned out over shards."""
    from dissect_core.dissect import dissect, resize_note
    from workers import shards

    if job.stage:
        resume_sharded(job)
        return
    inputs = shards.JobInputs(job)
    note = resize_note(inputs.model, inputs.dataset)
    if note:
        services.job_notes_set(job=job, notes=[note])
    n_images = len(inputs.dataset)
    shard_size = inputs.params.shard_size
    if n_images > shard_size:
        shards.start(job, n_images, shard_size)
        return
    with ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS) as reporter:
        reporter.progress("loading", 0, n_images)
        results = with_batch_backoff(
            lambda batch_size: dissect(
                inputs.model,
                inputs.dataset,
                inputs.layers,
                quantile=inputs.quantile,
                batch_size=batch_size,
                device=pick_device(),
                progress=reporter.progress,
                should_stop=reporter.should_stop,
                top_k_images=inputs.params.top_k_images,
                evidence_blocks=inputs.params.evidence_blocks,
                resamples=inputs.params.resamples,
                evidence_seed=inputs.params.evidence_seed,
            ),
            inputs.batch_size,
        )
        store_results(job, inputs.model, inputs.dataset, results, reporter)


def resume_sharded(job: Job) -> None:
    """A sharded job picked up again (its worker died): advance it or requeue its open shards."""
    from api.models import JobShard
    from workers import shards

    open_shards = JobShard.objects.filter(job=job, stage=job.stage).exclude(status=JobShard.Status.DONE)
    if job.stage == "finish" or not open_shards.exists():
        if job.stage == "finish":
            services.job_stage_set(job=job, stage="count")
        with ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS) as reporter:
            reporter.progress("merging", 0, 1)
            shards.advance(job, reporter)
        return
    with transaction.atomic():
        services.shards_requeue_unfinished(job=job)


def store_results(job: Job, model, dataset, results: dict, reporter: ProgressReporter) -> None:
    """Draw unit images, write every layer's results, and mark the job succeeded."""
    from dissect_core.visualize import save_unit_strips

    concepts = [(c.name, c.category) for c in dataset.concepts]
    results_dir = Path(settings.MEDIA_ROOT) / "results" / f"job-{job.pk}"
    if params_of(job, DissectBase).top_k_images > 0:
        for layer, result in results.items():
            reporter.progress("images", 0, result.units)
            save_unit_strips(
                model,
                dataset,
                result,
                results_dir / layer,
                device=pick_device(),
                progress=reporter.progress,
                should_stop=reporter.should_stop,
            )
    reporter.progress("storing", len(dataset), len(dataset))
    for layer, result in results.items():
        top = getattr(result, "top_images", None)
        services.layer_result_store(
            job=job,
            layer=layer,
            thresholds=np.asarray(result.thresholds, dtype=np.float64),
            iou=np.asarray(result.iou, dtype=np.float64),
            concepts=concepts,
            summary=result.summary(min_iou=0.04),
            top_images=[[int(i) for i in row] for row in np.asarray(top)] if top is not None else None,
            evidence=result.evidence.arrays() if getattr(result, "evidence", None) is not None else None,
        )
    services.job_succeed(job_id=job.pk, results_path=str(results_dir))

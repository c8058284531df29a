"""A job's life: created (its params checked by ``api.job_params``), queued, started, progressing,
and ended: succeeded, failed or cancelled. Every write of a job's state goes through here."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from api.errors import ApplicationError
from api.job_params import job_params_clean
from api.models import AblationCurve, ClassUnitImportance, Dataset, Job, LayerResult, NetworkModel, Unit
from api.services import queue, webhooks
from api.services.concepts import concept_stats_refresh

QUEUED_RETRY_AFTER_SECONDS = 30
GENERATOR_JOBS = (Job.Type.DISSECT, Job.Type.GENERATOR_REMOVE, Job.Type.GENERATOR_INSERT)


@transaction.atomic
def job_create(
    *,
    owner,
    type: str,
    model: NetworkModel,
    dataset: Dataset | None,
    params: dict[str, Any],
    callback_url: str = "",
    callback_progress: int | None = None,
) -> Job:
    """Create a job and enqueue it once the transaction commits (with ``callback_url``, its
    resource is POSTed there when it ends, and every ``callback_progress`` percent).

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
            raise ApplicationError(f"model {model.name} is a generator; its job types are {', '.join(GENERATOR_JOBS)}")
        if dataset is not None:
            raise ApplicationError(
                "generator jobs take no dataset: they generate their images and label them with params.concepts"
            )
    elif type in (Job.Type.GENERATOR_REMOVE, Job.Type.GENERATOR_INSERT):
        raise ApplicationError(f"{type} needs a generator; model {model.name} is a {model.kind}")
    elif dataset is None:
        raise ApplicationError(f"{type} jobs on a {model.kind} need a dataset")
    clean = job_params_clean(type=type, owner=owner, model=model, dataset=dataset, params=params)
    if callback_url:
        webhooks.callback_url_check(callback_url)
    if callback_progress is not None and not callback_url:
        raise ApplicationError("callback_progress needs a callback_url")
    # One submission at a time per user (their row locked), so the cap holds under concurrency.
    get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
    queued = Job.objects.filter(owner=owner, status=Job.Status.QUEUED).count()
    if queued >= settings.API_MAX_QUEUED_JOBS:
        raise ApplicationError(
            f"you have {queued} queued jobs, the most allowed (API_MAX_QUEUED_JOBS); "
            "submit more once some have started, or cancel some",
            status=429,
            extra={"queued": queued, "limit": settings.API_MAX_QUEUED_JOBS},
            headers={"Retry-After": str(QUEUED_RETRY_AFTER_SECONDS)},
        )
    job = Job.objects.create(
        owner=owner,
        type=type,
        model=model,
        dataset=dataset,
        params=clean,
        callback_url=callback_url,
        callback_progress=callback_progress,
    )
    transaction.on_commit(lambda: queue.job_enqueue(job.pk))
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
    drop_results(job)
    webhooks.delivery_create(job=job, event=job.status)
    return job


def drop_results(job: Job) -> None:
    """Remove whatever a job wrote (rows now, files once the transaction commits)."""
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

    A worker notices a cancel at its next batch, after ``drop_results`` removed the job's
    folders, and may write a file or two before that (a matrix, unit images, shard state).
    The task calls this when it ends. Returns True when the job is failed or cancelled.
    """
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
    if (
        job.status == Job.Status.RUNNING
        and job.heartbeat
        and (now - job.heartbeat).total_seconds() < settings.JOB_STALE_SECONDS
    ):
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
    job = Job.objects.only("status", "started", "progress", "callback_url", "callback_progress").get(pk=job_id)
    if job.status != Job.Status.RUNNING:
        return job.status
    fraction = min(1.0, max(0.0, fraction))
    crossed = webhooks.progress_crossed(job, job.progress, fraction)
    eta = None
    if job.started and fraction > 0.01:
        elapsed = (now - job.started).total_seconds()
        eta = max(0.0, elapsed * (1.0 - fraction) / fraction)
    Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).update(
        phase=phase,
        images_done=done,
        images_total=total,
        progress=fraction,
        eta_seconds=eta,
        heartbeat=now,
    )
    if crossed:
        webhooks.delivery_create(job=Job.objects.get(pk=job_id), event="progress")
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
    job.save(update_fields=["status", "progress", "phase", "eta_seconds", "finished", "results_path", "images_done"])
    if Unit.objects.filter(job=job).exists():
        concept_stats_refresh(model_id=job.model_id)
    webhooks.delivery_create(job=job, event=job.status)
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
    drop_results(job)
    webhooks.delivery_create(job=job, event=job.status)
    return job


def job_summary_store(*, job: Job, summary: dict) -> None:
    """Attach a small result summary to a running job."""
    Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(summary=summary)


def job_notes_set(*, job: Job, notes: list[str]) -> None:
    """Record what a user should know about how a job ran (e.g. images resized to the model's input
    size) in its ``summary["notes"]``, shown on the job page and in the API."""
    with transaction.atomic():
        locked = Job.objects.select_for_update().filter(pk=job.pk, status=Job.Status.RUNNING).first()
        if locked is None:
            return
        locked.summary = {**(locked.summary or {}), "notes": list(notes)}
        locked.save(update_fields=["summary"])


def job_stage_set(*, job: Job, stage: str) -> None:
    """Set the stage of a sharded job (``quantile``, ``refine``, ``count``, ``finish``)."""
    Job.objects.filter(pk=job.pk).update(stage=stage)
    job.stage = stage

"""Celery tasks: thin wrappers that load a job row, call dissect_core, and store through services."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from api import services
from config.celery import app
from workers.celery_setup import TRANSIENT_ERRORS, job_task

logger = logging.getLogger(__name__)


def _guarded(job_id: int, work: Callable[[], None]) -> None:
    """Run job work; bad input fails the job once with its message, transient faults retry."""
    from dissect_core.errors import Cancelled, DissectError

    try:
        work()
    except Cancelled:
        logger.info("job %s cancelled", job_id)
    except DissectError as exc:
        services.job_fail(job_id=job_id, message=exc.message)
    except SoftTimeLimitExceeded:
        services.job_fail(job_id=job_id, message="the job ran past its time limit")
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        logger.exception("job %s crashed", job_id)
        services.job_fail(job_id=job_id, message=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    finally:
        try:
            services.job_leftovers_remove(job_id=job_id)
        except TRANSIENT_ERRORS:
            logger.warning("job %s: could not check for files left after a stop", job_id)


@job_task
def run_job(*, job_id: int) -> None:
    """Run one job to a final state, or fan it out over shards (see workers.shards)."""
    from workers.ablation import run_ablation, run_attack, run_unit_classifier
    from workers.dissection import run_dissection

    job = services.job_start(job_id=job_id, worker=run_job.request.hostname or "worker")
    if job is not None:
        from workers.generators import run_generator_insert, run_generator_remove

        body = {
            "ablate": run_ablation,
            "attack": run_attack,
            "unit_classifier": run_unit_classifier,
            "generator_remove": run_generator_remove,
            "generator_insert": run_generator_insert,
        }.get(job.type, run_dissection)
        _guarded(job_id, lambda: body(job))


@job_task
def run_shard(*, job_id: int, stage: str, index: int) -> None:
    """Run one shard of a sharded job; the last shard of a stage opens the next stage."""
    from workers import shards
    from workers.reporting import ProgressReporter

    try:
        claimed = services.shard_start(
            job_id=job_id, stage=stage, index=index, worker=run_shard.request.hostname or "worker"
        )
    except services.ShardBusy:
        raise run_shard.retry(countdown=settings.JOB_STALE_SECONDS, max_retries=None) from None
    if claimed is None:
        return
    job, shard = claimed

    def work() -> None:
        if shards.run_shard(job, shard):
            job.refresh_from_db()
            with ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS) as reporter:
                reporter.progress("merging", 0, 1)
                shards.advance(job, reporter)

    _guarded(job_id, work)


@app.task(name="workers.deliver_webhook", acks_late=True, ignore_result=True)
def deliver_webhook(*, delivery_pk: int) -> None:
    """One attempt at a webhook delivery; a failed one is sent again after its backoff."""
    from api.services import queue, webhooks

    retry = webhooks.delivery_attempt(delivery_pk=delivery_pk)
    if retry is not None:
        queue.webhook_enqueue(delivery_pk, countdown=retry)


@app.task(name="workers.paint", ignore_result=False, acks_late=False, soft_time_limit=60, time_limit=90)
def paint(**kwargs) -> dict:
    """Edit one generated image (the painting endpoint waits for this): PNGs as base64 text."""
    import base64

    from dissect_core.errors import DissectError
    from workers.generators import paint_png

    try:
        out = paint_png(**kwargs)
    except DissectError as exc:
        return {"error": exc.message}
    return {
        "units": out["units"],
        "milliseconds": out["milliseconds"],
        "before": base64.b64encode(out["before"]).decode("ascii"),
        "after": base64.b64encode(out["after"]).decode("ascii"),
    }

"""Sending work to the workers by task name: the web process never imports ``workers``.

The names are those ``workers.celery_setup.job_task`` gives (``workers.<function>``); the
routing (the ``interactive`` queue for painting) is the Celery app's.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.result import AsyncResult
from kombu.exceptions import OperationalError as BrokerError

from config.celery import app

logger = logging.getLogger(__name__)

RUN_JOB = "workers.run_job"
RUN_SHARD = "workers.run_shard"
PAINT = "workers.paint"
DELIVER_WEBHOOK = "workers.deliver_webhook"


def job_enqueue(job_id: int) -> None:
    """Send a queued job to the workers. When the broker cannot take it (Redis restarting), the
    job stays queued in Postgres and a worker's ``jobs_requeue_lost`` sends it again."""
    try:
        app.send_task(RUN_JOB, kwargs={"job_id": job_id})
    except BrokerError as exc:
        logger.warning("job %s stays queued until the broker is back: %s", job_id, exc)


def shard_enqueue(job_id: int, stage: str, index: int) -> None:
    """Send one shard of a stage to the workers."""
    app.send_task(RUN_SHARD, kwargs={"job_id": job_id, "stage": stage, "index": index})


def webhook_enqueue(delivery_pk: int, countdown: float | None = None) -> None:
    """Send a webhook delivery (after ``countdown`` seconds); when the broker cannot take it, a
    worker's heartbeat sends it again once it is overdue."""
    try:
        app.send_task(DELIVER_WEBHOOK, kwargs={"delivery_pk": delivery_pk}, countdown=countdown)
    except BrokerError as exc:
        logger.warning("webhook delivery %s waits for the broker: %s", delivery_pk, exc)


def paint_send(**kwargs: Any) -> AsyncResult:
    """Send a painting request to the interactive queue; the caller waits for its result."""
    return app.send_task(PAINT, kwargs=kwargs)

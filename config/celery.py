"""The Celery app. Broker from settings; every task acks late, one at a time per process."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("netdissect")


def _configure(app: Celery) -> None:
    from django.conf import settings

    broker = settings.CELERY_BROKER_URL
    transport_options: dict = {"visibility_timeout": settings.JOB_TIME_LIMIT + 600}
    if broker.startswith("filesystem://"):
        folder = settings.CELERY_BROKER_FOLDER
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
    if broker.startswith("filesystem://"):
        results = f"file://{settings.CELERY_BROKER_FOLDER / 'results'}"
        (settings.CELERY_BROKER_FOLDER / "results").mkdir(parents=True, exist_ok=True)
    else:
        results = broker
    app.conf.update(
        broker_url=broker,
        # Only the interactive painting task keeps a result (the web process waits for it);
        # job state lives in Postgres and every other task ignores its result.
        result_backend=results,
        result_expires=600,
        task_queues=[Queue(name) for name in dict.fromkeys(["celery", "interactive", settings.WEBHOOK_QUEUE])],
        task_routes={
            "workers.paint": {"queue": "interactive"},
            "workers.deliver_webhook": {"queue": settings.WEBHOOK_QUEUE},
        },
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.JOB_SOFT_TIME_LIMIT,
        task_time_limit=settings.JOB_TIME_LIMIT,
        task_default_queue="celery",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )


_configure(app)
app.autodiscover_tasks(["workers"], related_name="tasks", force=False)

"""Worker-side wiring: the task decorator and the heartbeat each worker node sends."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from datetime import timedelta

from celery import signals
from django.conf import settings
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
)
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from config.celery import app

TRANSIENT_ERRORS = (OperationalError, InterfaceError, BrokerError, ConnectionError)


def job_task(func):
    """The one task decorator: late acks, redelivery when a worker dies, retries for transient faults."""
    return app.task(
        name=f"workers.{func.__name__}",
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=TRANSIENT_ERRORS,
        retry_backoff=2,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=8,
    )(func)


class _Heartbeat(threading.Thread):
    def __init__(self, hostname: str) -> None:
        super().__init__(name="worker-heartbeat", daemon=True)
        self.hostname = hostname
        self.started_at = timezone.now()
        self.stopped = threading.Event()

    def run(self) -> None:
        from api.services import (
            deliveries_resend_due,
            jobs_recover_stale,
            jobs_requeue_lost,
            shards_recover_stale,
            worker_heartbeat,
        )

        while not self.stopped.is_set():
            try:
                close_old_connections()
                worker_heartbeat(
                    hostname=self.hostname, pid=os.getpid(), device=settings.WORKER_DEVICE, started=self.started_at
                )
                jobs_recover_stale(
                    older_than=timedelta(seconds=settings.JOB_STALE_SECONDS), max_attempts=settings.JOB_MAX_ATTEMPTS
                )
                shards_recover_stale(older_than=timedelta(seconds=settings.JOB_STALE_SECONDS))
                jobs_requeue_lost(older_than=timedelta(seconds=settings.JOB_STALE_SECONDS))
                deliveries_resend_due(older_than=timedelta(seconds=settings.JOB_STALE_SECONDS + 30))
            except Exception:  # the database may be restarting; the next beat retries
                connection.close()
            self.stopped.wait(settings.WORKER_HEARTBEAT_SECONDS)

    def stop(self) -> None:
        from api.services import worker_gone

        self.stopped.set()
        with contextlib.suppress(Exception):
            worker_gone(hostname=self.hostname)


_beat: _Heartbeat | None = None


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **kwargs) -> None:
    global _beat
    hostname = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}:{os.getpid()}"
    _beat = _Heartbeat(hostname)
    _beat.start()


@signals.worker_shutdown.connect
def _stop_heartbeat(**kwargs) -> None:
    if _beat is not None:
        _beat.stop()


@signals.worker_init.connect
def _preload_engine(**kwargs) -> None:
    """Import torch, torchvision and the engine in the main process before the pool forks, so
    every pool process starts with them loaded: a fresh worker's first job no longer spends
    seconds importing them (CUDA is not touched, so forking stays safe). The engine's fused
    CPU loops are compiled or loaded from numba's cache here too."""
    import dissect_core.ablation
    import dissect_core.dissect
    import dissect_core.generators  # noqa: F401
    from dissect_core import fused

    fused.warm()

    with contextlib.suppress(ImportError):
        import torchvision  # noqa: F401


@signals.worker_process_init.connect
def _child_init(**kwargs) -> None:
    connection.close()

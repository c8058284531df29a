"""Worker heartbeats, and recovery of the jobs whose worker died or whose message was lost."""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from api.models import Job, WorkerHeartbeat
from api.services import queue, webhooks
from api.services.jobs import drop_results


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
        stale = Job.objects.select_for_update(skip_locked=True).filter(status=Job.Status.RUNNING, heartbeat__lt=cutoff)
        for job in stale:
            touched.append(job.pk)
            reason = f"no heartbeat from worker {job.worker or '?'} for over {older_than.total_seconds():.0f} s"
            if job.attempts >= max_attempts:
                job.status = Job.Status.FAILED
                job.error = f"{reason}, after {job.attempts} attempts"
                job.phase = "failed"
                job.finished = timezone.now()
                job.save(update_fields=["status", "error", "phase", "finished"])
                drop_results(job)
                webhooks.delivery_create(job=job, event=job.status)
            else:
                job.status = Job.Status.QUEUED
                job.phase = "requeued"
                job.error = reason
                job.heartbeat = timezone.now()  # a queued job's heartbeat: when it was last enqueued
                job.save(update_fields=["status", "phase", "error", "heartbeat"])
                transaction.on_commit(lambda pk=job.pk: queue.job_enqueue(pk))
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
            transaction.on_commit(lambda pk=job.pk: queue.job_enqueue(pk))
    return sent

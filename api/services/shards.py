"""Shards of a big dissection: opened per stage, claimed by workers, merged by the last one."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from api.models import Job, JobShard
from api.services import queue, webhooks


def shards_create(*, job: Job, stage: str, ranges: list[tuple[int, int]]) -> list[int]:
    """Open a stage of a sharded job: one pending shard per image range; enqueue them on commit.

    Returns:
        the shard indices created (existing ones are kept, so a replay is harmless).
    """
    with transaction.atomic():
        Job.objects.filter(pk=job.pk).update(stage=stage)  # the stage opens with its shards
        JobShard.objects.bulk_create(
            [JobShard(job=job, stage=stage, index=i, start=a, stop=b) for i, (a, b) in enumerate(ranges)],
            ignore_conflicts=True,
        )
        for i in range(len(ranges)):
            transaction.on_commit(lambda i=i: queue.shard_enqueue(job.pk, stage, i))
    return list(range(len(ranges)))


def shards_requeue_unfinished(*, job: Job) -> int:
    """Enqueue again every shard of the job's current stage that is not done."""
    pending = list(
        JobShard.objects.filter(job=job, stage=job.stage)
        .exclude(status=JobShard.Status.DONE)
        .values_list("index", flat=True)
    )
    for index in pending:
        transaction.on_commit(lambda i=index: queue.shard_enqueue(job.pk, job.stage, i))
    return len(pending)


def shard_start(*, job_id: int, stage: str, index: int, worker: str):
    """Claim a shard. Returns (job, shard), or None when there is nothing to do (job final,
    another stage current, shard done) ; raises ``ShardBusy`` when another worker holds it
    with a fresh heartbeat."""
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
        shard.started = now
        shard.save(update_fields=["status", "attempts", "worker", "heartbeat", "images_done", "started"])
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
    if webhooks.progress_crossed(job, job.progress, fraction):
        webhooks.delivery_create(job=Job.objects.get(pk=job.pk), event="progress")
    return job.status


SHARD_STAGE_SHARE = {"quantile": (0.0, 0.45), "refine": (0.45, 0.55), "count": (0.55, 0.92), "finish": (0.92, 0.99)}


def shard_done(*, shard_id: int, path: str) -> bool:
    """Mark a shard done; True when it was the last of its stage (the caller advances the job)."""
    with transaction.atomic():
        shard = JobShard.objects.select_for_update().get(pk=shard_id)
        job = Job.objects.select_for_update().get(pk=shard.job_id)
        if shard.status == JobShard.Status.DONE:
            return False
        shard.status = JobShard.Status.DONE
        shard.path = path
        shard.images_done = shard.stop - shard.start
        shard.heartbeat = shard.finished = timezone.now()
        shard.save(update_fields=["status", "path", "images_done", "heartbeat", "finished"])
        if job.is_final or job.stage != shard.stage:
            return False
        return not JobShard.objects.filter(job=job, stage=shard.stage).exclude(status=JobShard.Status.DONE).exists()


def shards_recover_stale(*, older_than: timedelta) -> list[int]:
    """Requeue shards whose worker stopped beating (the job itself may still look alive)."""
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
            transaction.on_commit(lambda s=shard: queue.shard_enqueue(s.job_id, s.stage, s.index))
    return requeued

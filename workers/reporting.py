"""Progress and heartbeats of running work, written from a side thread.

dissect_core calls ``progress`` every batch (cheap: it only stores the numbers) and
``should_stop`` every batch (cheap: it reads a flag the thread refreshed from the database).
A worker killed with -9 takes the thread with it, so the heartbeat stops and a live worker
requeues the work.
"""

from __future__ import annotations

import threading
from typing import ClassVar, Self

from django.db import connection

from api import services
from api.models import Job


class _Beat(threading.Thread):
    """Every ``interval`` seconds: write the state through a service; stop when the job is cancelled."""

    def __init__(self, name: str, interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    def progress(self, phase: str, done: int, total: int) -> None:
        raise NotImplementedError

    def should_stop(self) -> bool:
        return self.cancelled.is_set()

    def _write(self) -> str:
        """Write the current state; returns the job's status."""
        raise NotImplementedError

    def run(self) -> None:
        try:
            while not self.finished.wait(self.interval):
                try:
                    if self._write() == Job.Status.CANCELLED:
                        self.cancelled.set()
                except Exception:  # a database hiccup: the next beat retries
                    connection.close()
        finally:
            connection.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.finished.set()
        self.join(timeout=30)


class ProgressReporter(_Beat):
    """A job's phase, progress, time left and heartbeat."""

    PHASE_SHARE: ClassVar[dict[str, tuple[float, float]]] = {
        "forward": (0.0, 0.6),
        "quantile": (0.6, 0.72),
        "refine": (0.72, 0.8),
        "count": (0.8, 0.9),
        "images": (0.9, 0.97),
        "importance-cache": (0.0, 0.15),
        "importance-ablate": (0.15, 0.6),
        "sets-cache": (0.6, 0.7),
        "sets-ablate": (0.7, 0.95),
    }

    def __init__(self, job_id: int, interval: float) -> None:
        super().__init__(f"job-{job_id}-progress", interval)
        self.job_id = job_id
        self.state = ("starting", 0, 0)

    def progress(self, phase: str, done: int, total: int) -> None:
        self.state = (phase, done, total)

    def _write(self) -> str:
        phase, done, total = self.state
        start, end = self.PHASE_SHARE.get(phase, (0.0, 0.0) if phase in ("starting", "loading") else (0.97, 0.99))
        fraction = start + (end - start) * (done / total if total else 1.0)
        return services.job_progress(job_id=self.job_id, phase=phase, done=done, total=total, fraction=fraction)


class ShardReporter(_Beat):
    """One shard's images done and heartbeat (the job's progress is summed from its shards)."""

    def __init__(self, shard_id: int, offset: int, interval: float) -> None:
        super().__init__(f"shard-{shard_id}", interval)
        self.shard_id = shard_id
        self.done = 0

    def progress(self, phase: str, done: int, total: int) -> None:
        self.done = done

    def _write(self) -> str:
        return services.shard_progress(shard_id=self.shard_id, done=self.done)

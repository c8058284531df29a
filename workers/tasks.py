"""Celery tasks: thin wrappers that load a job row, call dissect_core, and store through services."""

from __future__ import annotations

import logging
import traceback

from celery.exceptions import SoftTimeLimitExceeded

from api import services
from workers.celery_setup import TRANSIENT_ERRORS, job_task

logger = logging.getLogger(__name__)


@job_task
def run_job(*, job_id: int) -> None:
    """Run one job to a final state (succeeded, failed with a reason, or cancelled)."""
    from dissect_core.errors import Cancelled, DissectError
    from workers.dissection import run_dissection

    job = services.job_start(job_id=job_id, worker=run_job.request.hostname or "worker")
    if job is None:
        return
    try:
        run_dissection(job)
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

"""A succeeded job reports all its images done, whatever the last (throttled, per-stage) progress report said."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_succeeding_completes_the_image_counter(user):
    from api import services
    from api.models import Job, NetworkModel

    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x")
    job = Job.objects.create(owner=user, type="ablate", model=model, status="running")
    services.job_progress(job_id=job.pk, phase="sets", done=192, total=614, fraction=0.9)
    job.refresh_from_db()
    assert (job.images_done, job.images_total) == (192, 614)
    services.job_succeed(job_id=job.pk)
    job.refresh_from_db()
    assert (job.status, job.images_done, job.images_total, job.progress) == ("succeeded", 614, 614, 1.0)


def test_failing_keeps_the_counter_where_it_stopped(user):
    from api import services
    from api.models import Job, NetworkModel

    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x")
    job = Job.objects.create(owner=user, type="ablate", model=model, status="running")
    services.job_progress(job_id=job.pk, phase="sets", done=192, total=614, fraction=0.9)
    services.job_fail(job_id=job.pk, message="stopped")
    job.refresh_from_db()
    assert (job.status, job.images_done, job.images_total) == ("failed", 192, 614)

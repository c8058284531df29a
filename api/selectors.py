"""Read paths: what a user may see, and the health of the parts the service stands on."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Count, Max, Q, QuerySet
from django.utils import timezone

from api.models import (
    Concept,
    Dataset,
    Job,
    LayerResult,
    NetworkModel,
    Unit,
    UnitConcept,
    WorkerHeartbeat,
    visible_to,
)


def model_list(*, user) -> QuerySet[NetworkModel]:
    return NetworkModel.objects.filter(visible_to(user)).select_related("owner").order_by("-created", "-id")


def dataset_list(*, user) -> QuerySet[Dataset]:
    return Dataset.objects.filter(visible_to(user)).select_related("owner").order_by("-created", "-id")


def job_list(*, user) -> QuerySet[Job]:
    return (
        Job.objects.filter(Q(owner=user) | Q(model__public=True, dataset__public=True))
        .select_related("owner", "model", "dataset")
        .order_by("-created", "-id")
    )


UNIT_FIELDS = ("id", "job", "model", "layer", "unit", "label", "label_name", "iou", "threshold", "top_images")


def unit_list(*, user) -> QuerySet[Unit]:
    """Visible units of succeeded jobs, best first, with their model's name and their label.

    Only the columns the unit serializers and the dashboard read are fetched (a model row
    carries large JSON fields). Top concepts: :func:`unit_top_concepts`, once per page.
    """
    return (
        Unit.objects.filter(Q(job__owner=user) | Q(model__public=True))
        .filter(job__status=Job.Status.SUCCEEDED)
        .select_related("model", "label")
        .only(*UNIT_FIELDS, "model__name", "label__name", "label__category")
        .order_by("-iou", "id")
    )


def unit_top_concepts(*, unit_ids: list[int]) -> dict[int, list[dict]]:
    """The top-K concepts of some units in one query, best first.

    Returns:
        {unit id: [{"concept", "category", "iou", "rank"}, ...]} (plain rows: a page of
        100 units has 500 of them, and model instances would cost more than the query).
    """
    found: dict[int, list[dict]] = {pk: [] for pk in unit_ids}
    rows = (
        UnitConcept.objects.filter(unit_id__in=unit_ids)
        .order_by("unit_id", "rank")
        .values_list("unit_id", "concept__name", "concept__category", "iou", "rank")
    )
    for unit_id, name, category, iou, rank in rows:
        found[unit_id].append({"concept": name, "category": category, "iou": iou, "rank": rank})
    return found


def concept_list(*, user, min_iou: float = 0.04) -> QuerySet[Concept]:
    """Concepts that label at least one visible unit with IoU >= min_iou, with unit and model counts.

    The unit conditions filter the join before grouping (one inner join, one pass over the
    matching units), rather than as aggregate ``filter=`` clauses over an outer join of every
    unit: about 10x faster over millions of units.
    """
    return (
        Concept.objects.filter(
            Q(labelled_units__job__owner=user) | Q(labelled_units__model__public=True),
            labelled_units__job__status=Job.Status.SUCCEEDED,
            labelled_units__iou__gte=min_iou,
        )
        .annotate(
            units=Count("labelled_units"),
            models=Count("labelled_units__model", distinct=True),
            best_iou=Max("labelled_units__iou"),
        )
        .order_by("-units", "name")
    )


def layer_summaries(*, model: NetworkModel, user) -> QuerySet[LayerResult]:
    return LayerResult.objects.filter(job__model=model, job__status=Job.Status.SUCCEEDED).filter(
        Q(job__owner=user) | Q(job__model__public=True)
    ).order_by("-job__created", "id")


def health() -> tuple[bool, dict]:
    report: dict = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        report["database"] = {"ok": True, "engine": connection.vendor}
    except Exception as exc:
        report["database"] = {"ok": False, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    report["broker"] = _broker_health()
    if report["database"]["ok"]:
        cutoff = timezone.now() - timedelta(seconds=settings.WORKER_ALIVE_SECONDS)
        alive = WorkerHeartbeat.objects.filter(last_seen__gte=cutoff).count()
        report["workers"] = {"ok": alive > 0, "alive": alive}
    else:
        report["workers"] = {"ok": False, "alive": 0, "error": "database unreachable"}
    ok = all(part["ok"] for part in report.values())
    report["status"] = "ok" if ok else "degraded"
    return ok, report


def _broker_health() -> dict:
    from config.celery import app

    url = settings.CELERY_BROKER_URL
    transport = url.split("://", 1)[0]
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            if transport.startswith("redis"):
                conn.default_channel.client.ping()
        return {"ok": True, "transport": transport}
    except Exception as exc:
        return {"ok": False, "transport": transport, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}


def job_matrix_path(*, job: Job, layer: str):
    """The IoU matrix file of one layer of a succeeded job."""
    from pathlib import Path

    from api.errors import ApplicationError

    if job.status != Job.Status.SUCCEEDED:
        raise ApplicationError(f"job {job.pk} is {job.status}; results exist once it has succeeded", status=409)
    row = job.layer_results.filter(layer=layer).first()
    if row is None:
        layers = ", ".join(job.layer_results.values_list("layer", flat=True))
        raise ApplicationError(f"job {job.pk} has no layer {layer!r}; its layers: {layers}", status=404)
    return Path(row.matrix_path)


def matrix_csv_lines(path):
    """Yield ``unit,concept,category,iou`` CSV lines of an IoU matrix file."""
    import csv
    import io

    import numpy as np

    with np.load(path) as data:
        iou = data["iou"]
        names = data["concept_names"]
        cats = data["concept_categories"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["unit", "concept", "category", "iou"])
    yield buffer.getvalue()
    for u in range(iou.shape[0]):
        buffer.seek(0)
        buffer.truncate()
        for c in range(iou.shape[1]):
            writer.writerow([u, names[c], cats[c], f"{iou[u, c]:.6f}"])
        yield buffer.getvalue()


def unit_image_path(*, unit: Unit):
    """The PNG strip of a unit's top-activating images (None when the job rendered none)."""
    from pathlib import Path

    folder = unit.job.results_path
    if not folder:
        return None
    path = Path(folder) / unit.layer / f"unit_{unit.unit:04d}.png"
    return path if path.is_file() else None

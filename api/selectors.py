"""Read paths: what a user may see, and the health of the parts the service stands on."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from api.concept_counts import concept_list
from api.concept_counts import concept_list_live as concept_list_live  # GET /api/concepts/'s read path
from api.models import (
    DETECTOR_MIN_IOU,
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
        Job.objects.filter(
            Q(owner=user)
            | Q(model__public=True, dataset__public=True)
            | Q(model__public=True, dataset__isnull=True)  # generator jobs have no dataset
        )
        .select_related("owner", "model", "dataset")
        .prefetch_related("deliveries")
        .order_by("-created", "-id")
    )


UNIT_FIELDS = (
    "id",
    "job",
    "model",
    "layer",
    "unit",
    "label",
    "label_name",
    "iou",
    "threshold",
    "top_images",
    "iou_low",
    "iou_high",
    "stability",
    "runner_up",
    "runner_up_iou",
    "chance_iou",
    "p_value",
)


def unit_list(*, user) -> QuerySet[Unit]:
    """Visible units of succeeded jobs, best first, with their model's name and their label.

    Only the columns the unit serializers and the dashboard read are fetched (a model row
    carries large JSON fields). Top concepts: :func:`unit_top_concepts`, once per page.
    """
    return (
        Unit.objects.filter(Q(job__owner=user) | Q(model__public=True))
        .filter(job__status=Job.Status.SUCCEEDED)
        .select_related("model", "label", "runner_up")
        .only(*UNIT_FIELDS, "model__name", "label__name", "label__category", "runner_up__name", "runner_up__category")
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


def layer_summaries(*, model: NetworkModel, user) -> QuerySet[LayerResult]:
    return (
        LayerResult.objects.filter(job__model=model, job__status=Job.Status.SUCCEEDED)
        .filter(Q(job__owner=user) | Q(job__model__public=True))
        .order_by("-job__created", "id")
    )


def model_layer_rows(*, model: NetworkModel, user) -> list[dict]:
    """Every dissectable layer of a model in execution order (name, type, units, map size, layout),
    each with its latest visible dissection (``job``, ``summary``; None when it has none); then any
    layer with results that the model's listing lacks (registered before it was listed)."""
    latest: dict[str, LayerResult] = {}
    for result in layer_summaries(model=model, user=user).only("job_id", "layer", "units", "summary"):
        latest.setdefault(result.layer, result)
    rows = []
    for entry in model.layers or []:
        result = latest.pop(entry["name"], None)
        rows.append(
            {
                **entry,
                "layer": entry["name"],
                "kind": entry.get("kind", "map"),
                "prefix": entry.get("prefix", []),
                "element": entry.get("element"),
                "job": result.job_id if result else None,
                "summary": result.summary if result else None,
            }
        )
    for name, result in latest.items():
        rows.append(
            {"layer": name, "name": name, "units": result.units, "job": result.job_id, "summary": result.summary}
        )
    return rows


def latest_unit_iou(*, model_id: int, layer: str):
    """(job id, float [U] best-concept IoU per unit) of the latest succeeded dissection of a layer, or None."""
    import numpy as np

    job = (
        Job.objects.filter(model_id=model_id, type=Job.Type.DISSECT, status=Job.Status.SUCCEEDED, units__layer=layer)
        .order_by("-finished", "-id")
        .first()
    )
    if job is None:
        return None
    rows = list(Unit.objects.filter(job=job, layer=layer).order_by("unit").values_list("unit", "iou"))
    iou = np.zeros(len(rows), np.float64)
    for unit, value in rows:
        if unit < len(iou):
            iou[unit] = value
    return job.pk, iou


def latest_ablation_job(*, model: NetworkModel, user, layer: str | None = None):
    jobs = job_list(user=user).filter(model=model, type=Job.Type.ABLATE, status=Job.Status.SUCCEEDED)
    if layer:
        jobs = jobs.filter(params__layer=layer)
    return jobs.order_by("-finished", "-id").first()


def important_units(*, job: Job, class_name: str, limit: int) -> list[dict]:
    """A class's most important units in an ablate job, each with its dissection label when one exists."""
    from api.models import ClassUnitImportance

    rows = list(
        ClassUnitImportance.objects.filter(job=job, class_name=class_name)
        .order_by("rank")
        .values("unit", "rank", "balanced_accuracy", "drop", "margin_drop")[:limit]
    )
    dissection = (
        Job.objects.filter(
            model_id=job.model_id, type=Job.Type.DISSECT, status=Job.Status.SUCCEEDED, units__layer=job.params["layer"]
        )
        .order_by("-finished", "-id")
        .first()
    )
    labels = {}
    if dissection is not None:
        labels = {
            u: (name or None, iou)
            for u, name, iou in Unit.objects.filter(
                job=dissection, layer=job.params["layer"], unit__in=[r["unit"] for r in rows]
            ).values_list("unit", "label_name", "iou")
        }
    for row in rows:
        row["label"], row["iou"] = labels.get(row["unit"], (None, None))
    return rows


def importance_ranking(*, job_id: int):
    """int64 [K, U] units per class, most important first, from an ablate job's stored ranks."""
    import numpy as np

    from api.models import ClassUnitImportance

    job = Job.objects.get(pk=job_id)
    classes = job.summary.get("classes", [])
    rows = list(
        ClassUnitImportance.objects.filter(job=job).order_by("class_index", "rank").values_list("class_index", "unit")
    )
    units = 1 + max((u for _, u in rows), default=-1)
    ranking = np.tile(np.arange(units, dtype=np.int64), (len(classes), 1))
    per_class: dict[int, list[int]] = {}
    for c, u in rows:
        per_class.setdefault(c, []).append(u)
    for c, order in per_class.items():
        if len(order) == units:
            ranking[c] = order
    return ranking


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
        return {
            "ok": False,
            "transport": transport,
            "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        }


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


def matrix_csv_lines(path, *, intervals: bool = False):
    """Yield ``unit,concept,category,iou`` CSV lines of an IoU matrix file (with ``intervals``,
    also ``iou_low,iou_high``: each IoU's interval, empty when the job computed none)."""
    import csv
    import io

    import numpy as np

    with np.load(path) as data:
        iou = data["iou"]
        names = data["concept_names"]
        cats = data["concept_categories"]
        low = data["iou_low"] if intervals and "iou_low" in data.files else None
        high = data["iou_high"] if intervals and "iou_high" in data.files else None
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["unit", "concept", "category", "iou", *(["iou_low", "iou_high"] if intervals else [])])
    yield buffer.getvalue()
    for u in range(iou.shape[0]):
        buffer.seek(0)
        buffer.truncate()
        for c in range(iou.shape[1]):
            row = [u, names[c], cats[c], f"{iou[u, c]:.6f}"]
            if intervals:
                row += ["", ""] if low is None or high is None else [f"{low[u, c]:.6f}", f"{high[u, c]:.6f}"]
            writer.writerow(row)
        yield buffer.getvalue()


def unit_image_path(*, unit: Unit):
    """The PNG strip of a unit's top-activating images (None when the job rendered none)."""
    from pathlib import Path

    folder = unit.job.results_path
    if not folder:
        return None
    path = Path(folder) / unit.layer / f"unit_{unit.unit:04d}.png"
    return path if path.is_file() else None


# Dashboard reads (api/dashboard.py). Each takes the requesting user, or rows already checked
# against them, and returns rows ordered for one page. DETECTOR_MIN_IOU (imported above from
# api.models) is the dashboard's detector threshold too.

DASHBOARD_UNIT_ORDERINGS = {
    "-iou": ("-iou", "id"),
    "iou": ("iou", "id"),
    "unit": ("unit", "id"),
    "concept": ("label_name", "-iou", "id"),
}


def dashboard_job_counts(*, user) -> dict[str, int]:
    """How many of the user's visible jobs are in each status."""
    rows = job_list(user=user).order_by().values_list("status").annotate(n=Count("id"))
    return dict(rows)


def dashboard_model_jobs(*, model: NetworkModel, user) -> QuerySet[Job]:
    """The visible jobs of one model, newest first (without the columns the job table leaves out)."""
    return dashboard_job_list(user=user).filter(model=model)


def dashboard_latest_layer_results(*, model: NetworkModel, user) -> dict[str, LayerResult]:
    """Per layer of a model, the result of its latest succeeded visible dissection."""
    rows = (
        layer_summaries(model=model, user=user)
        .select_related("job")
        .only("id", "layer", "units", "summary", "job__id", "job__created", "job__status")
    )
    latest: dict[str, LayerResult] = {}
    for row in rows:
        latest.setdefault(row.layer, row)
    return latest


def dashboard_detector_counts(
    *, layer_results: list[LayerResult], min_iou: float = DETECTOR_MIN_IOU, min_stability: float | None = None
) -> dict[tuple[int, str], list[tuple[str, str, int]]]:
    """Detector units (label IoU >= min_iou) per concept, for some (job, layer) results, in one query.

    With ``min_stability``, only labels with ``stability >= min_stability`` count (units without
    evidence then do not).

    Returns:
        {(job id, layer): [(concept, category, units), ...]} most units first.
    """
    found: dict[tuple[int, str], list[tuple[str, str, int]]] = {(r.job_id, r.layer): [] for r in layer_results}
    if not layer_results:
        return found
    which = Q()
    for r in layer_results:
        which |= Q(job_id=r.job_id, layer=r.layer)
    units = Unit.objects.filter(which, iou__gte=min_iou, label__isnull=False)
    if min_stability is not None:
        units = units.filter(stability__gte=min_stability)
    rows = units.order_by().values_list("job_id", "layer", "label__name", "label__category").annotate(n=Count("id"))
    for job_id, layer, name, category, n in rows:
        found[(job_id, layer)].append((name, category, n))
    for counts in found.values():
        counts.sort(key=lambda row: (-row[2], row[0]))
    return found


def dashboard_layer_units(
    *,
    user,
    job: Job,
    layer: str,
    concept: str = "",
    category: str = "",
    min_iou: float | None = None,
    min_stability: float | None = None,
    ordering: str = "-iou",
) -> QuerySet[Unit]:
    """The visible units of one layer of a job, filtered by label, category, IoU and label
    stability (units without evidence fail a stability bar), in an order of
    :data:`DASHBOARD_UNIT_ORDERINGS`."""
    units = unit_list(user=user).filter(job=job, layer=layer)
    if concept:
        units = units.filter(label_name=concept)
    if category:
        units = units.filter(label__category=category)
    if min_iou is not None:
        units = units.filter(iou__gte=min_iou)
    if min_stability is not None:
        units = units.filter(stability__gte=min_stability)
    return units.order_by(*DASHBOARD_UNIT_ORDERINGS.get(ordering, DASHBOARD_UNIT_ORDERINGS["-iou"]))


def dashboard_layer_labels(*, job: Job, layer: str) -> list[tuple[str, str, int]]:
    """The labels of one layer of a job with their unit counts: [(concept, category, units)]."""
    rows = (
        Unit.objects.filter(job=job, layer=layer, label__isnull=False)
        .order_by()
        .values_list("label__name", "label__category")
        .annotate(n=Count("id"))
    )
    return sorted(rows, key=lambda row: (row[0], row[1]))


def dashboard_unit_neighbours(*, user, unit: Unit) -> dict[str, Unit | None]:
    """The units numbered just below and above one unit in its layer (None at the ends)."""
    layer = unit_list(user=user).filter(job_id=unit.job_id, layer=unit.layer).select_related(None).only("id", "unit")
    return {
        "previous": layer.filter(unit__lt=unit.unit).order_by("-unit").first(),
        "next": layer.filter(unit__gt=unit.unit).order_by("unit").first(),
    }


def dashboard_unit_search(*, user, concept: str, min_iou: float | None = None) -> QuerySet[Unit]:
    """Every visible unit labelled with a concept (its name in any case), best IoU first."""
    names = list(Concept.objects.filter(name__iexact=concept.strip()).values_list("name", flat=True).distinct())
    units = unit_list(user=user).filter(label_name__in=names)
    if min_iou is not None:
        units = units.filter(iou__gte=min_iou)
    return units


def dashboard_concept_suggestions(*, user, text: str, limit: int = 30) -> list[dict]:
    """Concepts that label visible units, whose name contains ``text`` (all when empty), most units first."""
    concepts = Concept.objects.filter(name__icontains=text.strip()) if text else None
    return concept_list(user=user, min_iou=0.0, concepts=concepts)[:limit]


def dashboard_job_list(*, user, status: str = "") -> QuerySet[Job]:
    """Visible jobs for the job table, newest first: ``status`` is one status, "active" (queued or
    running) or "" (all); the large text and JSON columns the table does not show are left out."""
    jobs = job_list(user=user).defer("summary", "error", "model__layers", "model__classes", "dataset__classes")
    if status == "active":
        return jobs.filter(status__in=[Job.Status.QUEUED, Job.Status.RUNNING])
    if status:
        return jobs.filter(status=status)
    return jobs


def job_image_path(*, job: Job, name: str):
    """The PNG file a succeeded generator job lists in ``summary["images"]``."""
    from pathlib import Path

    from django.http import Http404

    names = set((job.summary or {}).get("images", {}).values()) if job.status == Job.Status.SUCCEEDED else set()
    path = Path(job.results_path) / f"{name}.png"
    if name not in names or not job.results_path or not path.is_file():
        raise Http404(f"job {job.pk} has no image {name!r}")
    return path

"""The concept summaries that GET /api/concepts/ reads instead of the units: each model's
(ConceptStat), rewritten when its job succeeds, and each visibility scope's (ConceptStatScope
and, on Postgres, the IoU cells: :mod:`api.services.concept_cells`), rewritten by bucket of
models."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Count, Max, Q

from api.models import (
    DETECTOR_MIN_IOU,
    SCOPE_BUCKETS,
    SIGNIFICANT_P_MAX,
    STABLE_LABEL_MIN,
    ConceptIouCell,
    ConceptStat,
    ConceptStatScope,
    Job,
    NetworkModel,
    Unit,
)
from api.services.concept_cells import scope_rows_write


@transaction.atomic
def concept_stats_refresh(*, model_id: int, scopes: bool = True) -> int:
    """Recompute one model's ConceptStat rows from its units: per label, job owner and bar, the
    units of succeeded jobs with iou >= DETECTOR_MIN_IOU (and, for the bars, a stable label,
    one above chance, or both), and their best IoU.

    The model row is locked first (FOR NO KEY UPDATE: jobs and units referencing it can still
    be written), so two jobs of the same model finishing together rewrite its rows one after the
    other; the second sees the first's status once it has the lock. Then (``scopes``) the
    scope rows of the model's bucket: of the public scope, or of the private scopes of
    everyone who ran a job on it.

    Returns:
        the number of rows written (0 when the model no longer exists).
    """
    locked = list(NetworkModel.objects.select_for_update(no_key=True).filter(pk=model_id).values_list("public"))
    if not locked:
        return 0
    public = locked[0][0]
    ConceptStat.objects.filter(model_id=model_id).delete()
    stable = Q(stability__gte=STABLE_LABEL_MIN)
    significant = Q(p_value__lte=SIGNIFICANT_P_MAX)
    bars = {
        ConceptStat.Bar.ALL: None,
        ConceptStat.Bar.STABLE: stable,
        ConceptStat.Bar.SIGNIFICANT: significant,
        ConceptStat.Bar.BOTH: stable & significant,
    }
    aggregates = {}
    for bar, condition in bars.items():
        aggregates[f"units_{bar}"] = Count("id", filter=condition)
        aggregates[f"best_{bar}"] = Max("iou", filter=condition)
    rows = (
        Unit.objects.filter(
            model_id=model_id, job__status=Job.Status.SUCCEEDED, label__isnull=False, iou__gte=DETECTOR_MIN_IOU
        )
        .order_by()
        .values("label_id", "job__owner_id")
        .annotate(**aggregates)
    )
    created = ConceptStat.objects.bulk_create(
        [
            ConceptStat(
                bar=bar,
                concept_id=row["label_id"],
                model_id=model_id,
                owner_id=row["job__owner_id"],
                units=row[f"units_{bar}"],
                best_iou=row[f"best_{bar}"],
            )
            for row in rows
            for bar in bars
            if row[f"units_{bar}"]
        ],
        batch_size=5000,
    )
    if scopes:
        owners = [None] if public else job_owners(model_id=model_id)
        concept_scopes_refresh(scopes=owners, bucket=model_id % SCOPE_BUCKETS)
    return len(created)


def job_owners(*, model_id: int | None = None) -> list[int]:
    """Who ran jobs (any status) on models that are not public, or on one model: the private
    scopes that hold, or held, their units."""
    jobs = Job.objects.filter(model__public=False) if model_id is None else Job.objects.filter(model_id=model_id)
    return sorted(set(jobs.order_by().values_list("owner_id", flat=True).distinct()))


_SCOPE_LOCK = 0x4E44_5343_0000_0000  # "NDSC": advisory lock keys (+ 64 x owner id + bucket)


@transaction.atomic
def concept_scopes_refresh(*, scopes: list[int | None], bucket: int | None = None) -> None:
    """Rewrite the ConceptStatScope rows of some scopes (None: the public models; an id: that
    user's jobs on models that are not public), of one bucket of models (model id modulo
    SCOPE_BUCKETS) or of all.

    On Postgres from the units, with the IoU cells of every bar (:mod:`api.services.concept_cells`),
    each scope and bucket locked first (a
    transaction advisory lock, in order), so two jobs finishing together rewrite a bucket one
    after the other, the second from a snapshot that holds the first's rows. Elsewhere (the
    embedded SQLite) the detector counts are summed from ConceptStat, without cells.
    """
    table = ConceptStatScope._meta.db_table
    with transaction.get_connection().cursor() as cursor:
        postgres = cursor.db.vendor == "postgresql"
        for owner in sorted(scopes, key=lambda o: -1 if o is None else o):
            if postgres:
                keys = range(SCOPE_BUCKETS) if bucket is None else [bucket]
                for key in keys:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_SCOPE_LOCK + 64 * (owner or 0) + key])
            scope = "scope_owner_id IS NULL" if owner is None else "scope_owner_id = %s"
            args: list = [] if owner is None else [owner]
            if bucket is not None:
                scope += " AND bucket = %s"
                args.append(bucket)
            cursor.execute(f"DELETE FROM {table} WHERE {scope}", args)
            if postgres:
                cursor.execute(f"DELETE FROM {ConceptIouCell._meta.db_table} WHERE {scope}", args)
                where, where_args = _scope_where(owner, bucket, "j.owner_id")
                scope_rows_write(cursor, owner=owner, where=where, args=where_args)
            else:
                cursor.execute(*_scope_from_stats(owner, bucket))


def _scope_where(owner: int | None, bucket: int | None, job_owner: str) -> tuple[str, list]:
    """Which models and jobs a scope (and bucket) holds, over nd_model m."""
    where, args = ("m.public", []) if owner is None else (f"NOT m.public AND {job_owner} = %s", [owner])
    if bucket is not None:
        where += f" AND m.id %% {SCOPE_BUCKETS} = %s"
        args.append(bucket)
    return where, args


def _scope_from_stats(owner: int | None, bucket: int | None) -> tuple[str, list]:
    where, args = _scope_where(owner, bucket, "s.owner_id")
    return (
        f"INSERT INTO {ConceptStatScope._meta.db_table}"
        " (bar, scope_owner_id, concept_id, bucket, units, model_count, best_iou)"
        f" SELECT s.bar, %s, s.concept_id, m.id %% {SCOPE_BUCKETS}, SUM(s.units), COUNT(DISTINCT s.model_id),"
        " MAX(s.best_iou)"
        f" FROM {ConceptStat._meta.db_table} s JOIN {NetworkModel._meta.db_table} m ON m.id = s.model_id"
        f" WHERE {where} GROUP BY s.bar, s.concept_id, m.id %% {SCOPE_BUCKETS}",
        [owner, *args],
    )


@transaction.atomic
def concept_scopes_rebuild() -> int:
    """Every scope's rows anew from ConceptStat (after ``concept_stats_rebuild`` rewrote it)."""
    owners = job_owners()
    ConceptStatScope.objects.all().delete()
    ConceptIouCell.objects.all().delete()
    concept_scopes_refresh(scopes=[None, *sorted(owners)])
    return ConceptStatScope.objects.count()

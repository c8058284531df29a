"""Storing results: a layer's units, their top concepts and IoU matrix; an ablate job's importance and
curves; the per-model concept summary."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max, Q

from api.models import (
    DETECTOR_MIN_IOU,
    SCOPE_BUCKETS,
    SIGNIFICANT_P_MAX,
    STABLE_LABEL_MIN,
    AblationCurve,
    ClassUnitImportance,
    Concept,
    ConceptIouCell,
    ConceptStat,
    ConceptStatScope,
    Job,
    LayerResult,
    NetworkModel,
    Unit,
    UnitConcept,
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


def concepts_ensure(*, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], Concept]:
    """Get or create concepts by (name, category) in bulk (one query when they all exist)."""
    wanted = set(pairs)
    found = {(c.name, c.category): c for c in Concept.objects.filter(name__in={n for n, _ in wanted})}
    missing = wanted - found.keys()
    if missing:
        Concept.objects.bulk_create(
            [Concept(name=n, category=c) for n, c in missing], ignore_conflicts=True, batch_size=2000
        )
        for concept in Concept.objects.filter(name__in={n for n, _ in missing}):
            found.setdefault((concept.name, concept.category), concept)
    return found


def _top_concepts(iou: np.ndarray, k: int) -> np.ndarray:
    """Column indices [U, min(k, C)] of each row's k highest IoUs, best first, ties to the lower
    column: the first k of a stable argsort of -iou, without sorting every row."""
    units_count, n_concepts = iou.shape
    k = min(k, n_concepts)
    if k == 0:
        return np.zeros((units_count, 0), dtype=np.intp)
    neg = -iou
    if n_concepts <= 4 * k or np.isnan(neg).any():
        return np.argsort(neg, axis=1, kind="stable")[:, :k]
    kth = np.partition(neg, k - 1, axis=1)[:, k - 1 : k]
    rows, cols = np.nonzero(neg <= kth)
    order = np.lexsort((cols, neg[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    starts = np.searchsorted(rows, np.arange(units_count))
    return cols[starts[:, None] + np.arange(k)]


def _copy_text(value: str) -> str:
    """A value for Postgres COPY text format (tab-separated, backslash escapes)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy_into(cursor, model, fields: list[str], lines: list[str]) -> None:
    ops = transaction.get_connection().ops
    table = ops.quote_name(model._meta.db_table)
    columns = ", ".join(ops.quote_name(model._meta.get_field(f).column) for f in fields)
    cursor.cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(lines)))


@dataclass(frozen=True)
class _UnitRows:
    """A layer's unit rows before they are written: label, best IoU and threshold per unit, and
    the top-K concept ids [U, K] with their IoUs [U, K]."""

    label_ids: list[int | None]
    label_names: list[str]
    best_iou: list[float]
    thresholds: list[float]
    score_concepts: np.ndarray
    score_iou: np.ndarray
    top_concepts_json: list[str]  # per unit, its top-K as GET /api/units/ renders them
    evidence: dict[str, list] | None = None  # EVIDENCE_FIELDS -> U values (None: unknown)


_UNIT_COLUMNS: tuple[str, ...] = ("id", "job", "model", "layer", "unit", "label", "label_name", "iou", "threshold")
_UNIT_COLUMNS += ("top_images", "top_concepts_json")
# The label evidence columns of nd_unit, in the order the writers send them.
EVIDENCE_FIELDS = ("iou_low", "iou_high", "stability", "runner_up", "runner_up_iou", "chance_iou", "p_value")


def _evidence_values(rows: _UnitRows, u: int) -> list:
    if rows.evidence is None:
        return [None] * len(EVIDENCE_FIELDS)
    return [rows.evidence[name][u] for name in EVIDENCE_FIELDS]


def _copy_value(value) -> str:
    return "\\N" if value is None else repr(value)


def _store_units_copy(*, job: Job, layer: str, rows: _UnitRows, top_images: list[str]) -> None:
    """Postgres: the layer's units and scores by two COPYs, unit ids drawn from the sequence first."""
    units_count = len(rows.label_ids)
    with transaction.get_connection().cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
            [Unit._meta.db_table, Unit._meta.pk.column, units_count],
        )
        ids = [row[0] for row in cursor.fetchall()]
        prefix = f"\t{job.pk}\t{job.model_id}\t{_copy_text(layer)}\t"
        extra = ["\t".join(_copy_value(v) for v in _evidence_values(rows, u)) for u in range(units_count)]
        labels = [
            "\\N\t" if label is None else f"{label}\t{_copy_text(name)}"
            for label, name in zip(rows.label_ids, rows.label_names, strict=True)
        ]
        _copy_into(
            cursor,
            Unit,
            [*_UNIT_COLUMNS, *EVIDENCE_FIELDS],
            [
                f"{ids[u]}{prefix}{u}\t{labels[u]}\t{rows.best_iou[u]!r}\t{rows.thresholds[u]!r}\t{top_images[u]}"
                f"\t{_copy_text(rows.top_concepts_json[u])}\t{extra[u]}\n"
                for u in range(units_count)
            ],
        )
        concepts = rows.score_concepts.tolist()
        ious = rows.score_iou.tolist()
        _copy_into(
            cursor,
            UnitConcept,
            ["unit", "concept", "rank", "iou"],
            [
                f"{ids[u]}\t{concept}\t{rank}\t{ious[u][rank]!r}\n"
                for u in range(units_count)
                for rank, concept in enumerate(concepts[u])
            ],
        )


def _store_units_orm(*, job: Job, layer: str, rows: _UnitRows, top_images: list[list[int]]) -> None:
    """Other databases (the embedded SQLite): batched bulk_create."""
    Unit.objects.bulk_create(
        [
            Unit(
                job=job,
                model_id=job.model_id,
                layer=layer,
                unit=u,
                label_id=rows.label_ids[u],
                label_name=rows.label_names[u],
                iou=rows.best_iou[u],
                threshold=rows.thresholds[u],
                top_images=top_images[u],
                top_concepts_json=rows.top_concepts_json[u],
                **{
                    ("runner_up_id" if name == "runner_up" else name): value
                    for name, value in zip(EVIDENCE_FIELDS, _evidence_values(rows, u), strict=True)
                },
            )
            for u in range(len(rows.label_ids))
        ],
        batch_size=2000,
    )
    unit_ids = dict(Unit.objects.filter(job=job, layer=layer).values_list("unit", "id"))
    concepts = rows.score_concepts.tolist()
    ious = rows.score_iou.tolist()
    UnitConcept.objects.bulk_create(
        [
            UnitConcept(unit_id=unit_ids[u], concept_id=concept, rank=rank, iou=ious[u][rank])
            for u in range(len(rows.label_ids))
            for rank, concept in enumerate(concepts[u])
        ],
        batch_size=5000,
    )


def layer_result_store(
    *,
    job: Job,
    layer: str,
    thresholds: np.ndarray,
    iou: np.ndarray,
    concepts: list[tuple[str, str]],
    summary: dict,
    top_images: list[list[int]] | None = None,
    evidence: dict[str, np.ndarray] | None = None,
) -> int:
    """Write one layer's units, top-K concept scores and IoU matrix file, idempotently.

    In one transaction, with the job row locked: the layer's earlier rows (a redelivered
    task) are deleted, then its units and their top-K scores are written in bulk (COPY on
    Postgres, batched bulk_create elsewhere) and its LayerResult is upserted. The matrix
    file is written first, to a temporary name renamed into place.

    Args:
        thresholds: float [U], t_u per unit.
        iou: float [U, C], IoU per unit and concept (columns in ``concepts`` order).
        concepts: C pairs (name, category).
        top_images: U lists of image indices, or None.
        evidence: each label's evidence (``dissect_core.evidence.LabelEvidence.arrays()``):
            [U] arrays named as EVIDENCE_FIELDS (NaN: none; runner_up a column, -1: none) and
            the [U, C] interval matrices ``low`` and ``high`` (written to the matrix file).
    Returns:
        the number of units written (0 when the job is no longer running).
    """
    units_count, n_concepts = iou.shape
    if n_concepts != len(concepts) or thresholds.shape != (units_count,):
        raise ValueError("iou, thresholds and concepts disagree in shape")
    if top_images is not None and len(top_images) != units_count:
        raise ValueError("top_images must hold one list per unit")
    k = max(1, settings.UNIT_TOP_CONCEPTS)
    folder = Path(settings.MEDIA_ROOT) / "results" / f"job-{job.pk}"
    folder.mkdir(parents=True, exist_ok=True)
    matrix_path = folder / f"{layer}.npz"
    tmp = folder / f".{layer}.tmp.npz"
    if evidence is not None:
        bad = [k for k in EVIDENCE_FIELDS if np.shape(evidence.get(k)) != (units_count,)]
        bad += [k for k in ("low", "high") if np.shape(evidence.get(k)) != iou.shape]
        if bad:
            raise ValueError(f"evidence arrays missing or of the wrong shape: {', '.join(bad)}")
    extra = {} if evidence is None else {"iou_low": evidence["low"], "iou_high": evidence["high"]}
    np.savez_compressed(
        tmp,
        iou=iou.astype(np.float32),
        thresholds=thresholds.astype(np.float32),
        concept_names=np.array([n for n, _ in concepts]),
        concept_categories=np.array([c for _, c in concepts]),
        **{k: np.asarray(v, np.float32) for k, v in extra.items()},
    )
    os.replace(tmp, matrix_path)
    concept_rows = concepts_ensure(pairs=list(concepts))
    column_ids = np.array([concept_rows[pair].pk for pair in concepts], dtype=np.int64)
    order = _top_concepts(iou, k)
    if n_concepts:
        best = iou[np.arange(units_count), order[:, 0]]
        label_ids = [int(c) if b > 0 else None for c, b in zip(column_ids[order[:, 0]], best, strict=True)]
        label_names = [concepts[c][0] if b > 0 else "" for c, b in zip(order[:, 0], best, strict=True)]
    else:
        best = np.zeros(units_count)
        label_ids, label_names = [None] * units_count, [""] * units_count
    score_iou = np.take_along_axis(iou, order, axis=1).astype(float)
    rows = _UnitRows(
        label_ids=label_ids,
        label_names=label_names,
        best_iou=np.where(best > 0, best, 0.0).astype(float).tolist(),
        thresholds=thresholds.astype(float).tolist(),
        score_concepts=column_ids[order],
        score_iou=score_iou,
        top_concepts_json=_top_concepts_json(order, score_iou, [concept_rows[pair] for pair in concepts]),
        evidence=None if evidence is None else _evidence_columns(evidence, column_ids, label_ids),
    )
    images = [[int(i) for i in row] for row in top_images] if top_images is not None else [[]] * units_count
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        if locked.status != Job.Status.RUNNING:
            return 0
        Unit.objects.filter(job=job, layer=layer).delete()
        if transaction.get_connection().vendor == "postgresql":
            _store_units_copy(job=job, layer=layer, top_images=[_copy_text(json.dumps(i)) for i in images], rows=rows)
        else:
            _store_units_orm(job=job, layer=layer, top_images=images, rows=rows)
        LayerResult.objects.update_or_create(
            job=job,
            layer=layer,
            defaults={"units": units_count, "summary": summary, "matrix_path": str(matrix_path)},
        )
    return units_count


def _top_concepts_json(order: np.ndarray, score_iou: np.ndarray, concept_rows: list[Concept]) -> list[str]:
    """Each unit's top-K concepts as the unit list renders them (UnitConceptSerializer's fields:
    concept, category, iou, rank), compact JSON with the IoUs the scores store; empty where an
    IoU is not finite (JSON has no NaN: the list then reads the scores)."""
    named = [(row.name, row.category) for row in concept_rows]
    ious = score_iou.tolist()
    out: list[str] = []
    for u, columns in enumerate(order.tolist()):
        top = [
            {"concept": named[c][0], "category": named[c][1], "iou": ious[u][rank], "rank": rank}
            for rank, c in enumerate(columns)
        ]
        try:
            out.append(json.dumps(top, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
        except ValueError:
            out.append("")
    return out


def _evidence_columns(evidence: dict[str, np.ndarray], column_ids: np.ndarray, label_ids: list) -> dict[str, list]:
    """The evidence as column values per unit (None where NaN, or where the unit has no label)."""
    out: dict[str, list] = {}
    for name in EVIDENCE_FIELDS:
        values = np.asarray(evidence[name])
        if name == "runner_up":
            out[name] = [int(column_ids[c]) if c >= 0 else None for c in values.astype(np.int64).tolist()]
        else:
            out[name] = [None if math.isnan(v) else v for v in values.astype(float).tolist()]
    for name in EVIDENCE_FIELDS:
        out[name] = [v if label is not None else None for v, label in zip(out[name], label_ids, strict=True)]
    return out


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def ablation_store(*, job: Job, layer: str, importance_rows: list[dict], curve_rows: list[dict], summary: dict) -> None:
    """Write an ablate job's unit x class importance and set-ablation curves, idempotently."""
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        if locked.status != Job.Status.RUNNING:
            return
        ClassUnitImportance.objects.filter(job=job).delete()
        AblationCurve.objects.filter(job=job).delete()
        ClassUnitImportance.objects.bulk_create(
            [
                ClassUnitImportance(
                    job=job,
                    model_id=job.model_id,
                    layer=layer,
                    class_index=row["class_index"],
                    class_name=row["class"],
                    rank=row["rank"],
                    unit=row["unit"],
                    balanced_accuracy=row["balanced_accuracy"],
                    drop=row["drop"],
                    margin_drop=row["margin_drop"],
                )
                for row in importance_rows
                if _finite(row["balanced_accuracy"]) is not None
            ],
            batch_size=5000,
        )
        AblationCurve.objects.bulk_create(
            [
                AblationCurve(
                    job=job,
                    class_index=row["class_index"],
                    class_name=row["class"],
                    k=row["k"],
                    baseline=_finite(row["baseline"]),
                    removed_top=_finite(row["removed_top"]),
                    kept_top=_finite(row["kept_top"]),
                    removed_top_accuracy=row["removed_top_accuracy"],
                    kept_top_accuracy=row["kept_top_accuracy"],
                )
                for row in curve_rows
            ],
            batch_size=5000,
        )
        locked.summary = summary
        locked.save(update_fields=["summary"])

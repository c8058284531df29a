"""Storing results: a layer's units, their top concepts and IoU matrix; an ablate job's importance and
curves. The concept summaries they feed are in :mod:`api.services.concepts`."""

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

from api.models import (
    AblationCurve,
    ClassUnitImportance,
    Concept,
    Job,
    LayerResult,
    Unit,
    UnitConcept,
)


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


def unit_audiences_repair() -> int:
    """Recompute ``Unit.audience`` wherever it differs from its job's and model's state; return
    how many units were wrong. The triggers of migration 0018 keep it on every write through
    Postgres; units loaded with them off (a bulk COPY under ``session_replication_role =
    replica``) need this. Postgres only (0 elsewhere, where nothing reads the column)."""
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        return 0
    with connection.cursor() as cursor:
        # Set to NULL, the row trigger writes the computed value (whatever the statement sends).
        cursor.execute(
            "UPDATE nd_unit SET audience = NULL WHERE audience IS DISTINCT FROM nd_unit_audience_of(job_id, model_id)"
        )
        return cursor.rowcount


def unit_pages_fill() -> int:
    """Write ``Unit.page_json`` (migration 0019) where it is empty and the unit has its own top
    concepts: units stored before 0019 or loaded with the triggers off. Return how many. The
    unit list reads them either way (an empty one is built at read time); written, a page reads
    one column per unit. Postgres only (0 elsewhere)."""
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        return 0
    with connection.cursor() as cursor:
        # Written by the row trigger (whatever the statement sends), from nd_unit_page_json.
        cursor.execute("UPDATE nd_unit SET page_json = '' WHERE page_json = '' AND top_concepts_json <> ''")
        return cursor.rowcount

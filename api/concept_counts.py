"""GET /api/concepts/: the concepts that label a user's visible units, counted from the summary
rows at the detector threshold and the evidence bars (:class:`api.models.ConceptStatScope`), from
the IoU cells at any other threshold (:class:`api.models.ConceptIouCell`, Postgres), or from the
units themselves."""

from __future__ import annotations

import math
from collections.abc import Sequence

from django.db import connection
from django.db.models import Count, Max, Q, QuerySet, Sum

from api.models import (
    DETECTOR_MIN_IOU,
    SCOPE_BUCKETS,
    SIGNIFICANT_P_MAX,
    STABLE_LABEL_MIN,
    Concept,
    ConceptIouCell,
    ConceptStat,
    Job,
)

CONCEPT_FIELDS = ("id", "name", "category", "units", "models", "best_iou")


def concept_list(
    *,
    user,
    min_iou: float = DETECTOR_MIN_IOU,
    min_stability: float | None = None,
    max_p_value: float | None = None,
    concepts: QuerySet[Concept] | None = None,
    ordering: Sequence[str] = (),
) -> list[dict]:
    """Concepts that label at least one visible unit with IoU >= min_iou, with unit and model
    counts and the best IoU (a dict of CONCEPT_FIELDS each), among ``concepts`` (default: all),
    most units first (then name, id) unless ``ordering`` names fields (``-`` for descending).

    The counts are sums of summary rows per scope (the public models' units, and the user's own
    jobs' units on models that are not public: exactly the units the live query counts, and
    sharing no model) and bucket of models. At the detector threshold (the default) they are
    :class:`api.models.ConceptStatScope`'s counts; at any other ``min_iou`` (Postgres) one
    :class:`api.models.ConceptIouCell` per scope and bucket. Evidence filters other than the
    bars (and other thresholds on SQLite) count the units: :func:`concept_list_live`.
    """
    concepts = Concept.objects.all() if concepts is None else concepts
    bar = _concept_stat_bar(min_stability, max_p_value)
    if bar is not None and min_iou == DETECTOR_MIN_IOU:
        rows = (
            concepts.filter(
                Q(scope_stats__scope_owner=user) | Q(scope_stats__scope_owner__isnull=True),
                scope_stats__bar=bar,
                scope_stats__units__gt=0,
            )
            .annotate(
                units=Sum("scope_stats__units"),
                models=Sum("scope_stats__model_count"),
                best_iou=Max("scope_stats__best_iou"),
            )
            .order_by("-units", "name", "id")
        )
    elif bar is not None and connection.vendor == "postgresql" and math.isfinite(min_iou):
        return _concept_list_from_cells(user=user, min_iou=min_iou, bar=bar, concepts=concepts, ordering=ordering)
    else:
        rows = concept_list_live(
            user=user, min_iou=min_iou, min_stability=min_stability, max_p_value=max_p_value, concepts=concepts
        )
    if ordering:
        rows = rows.order_by(*ordering)
    return list(rows.values(*CONCEPT_FIELDS))


def _concept_list_from_cells(
    *, user, min_iou: float, bar: str, concepts: QuerySet[Concept], ordering: Sequence[str]
) -> list[dict]:
    """:func:`concept_list` at any threshold t: per scope and bucket, the IoU cell that holds t
    (the last with ``lo <= t``); per concept, what lies above that cell plus the cell's units
    (and model bests) with IoU >= t; the best IoU is the best above the cell or in it (a listed
    concept has a unit >= t, so its best is in one of the two)."""
    cell = ConceptIouCell._meta.db_table
    order = {"units": "k.units", "models": "k.models", "name": "c.name"}
    terms = [f"{order[term.lstrip('-')]}{' DESC' if term.startswith('-') else ''}" for term in ordering]
    order_by = ", ".join([*terms, "c.id"] if terms else ["k.units DESC", "c.name", "c.id"])
    chosen, chosen_params = "", []
    if concepts.query.where:  # filtered: only those concepts
        subquery, params = concepts.order_by().values("id").query.sql_with_params()
        chosen, chosen_params = f"WHERE c.id IN ({subquery})", list(params)
    # The last cell with lo <= t, in the index's own order (backwards): spelled out whole, the
    # public scope (scope_owner_id IS NULL) reads one index entry rather than sorting its cells.
    lookup = (
        f"SELECT * FROM {cell} WHERE {{scope}} AND bucket = b.bucket AND bar = %s AND lo <= %s"
        " ORDER BY scope_owner_id DESC NULLS FIRST, bucket DESC, bar DESC, lo DESC LIMIT 1"
    )
    # A listed concept has a unit >= t, so the cell's IoUs below t are never its best either.
    sql = f"""WITH cells AS (
            SELECT cell.* FROM generate_series(0, {SCOPE_BUCKETS - 1}) AS b (bucket)
            CROSS JOIN LATERAL ({lookup.format(scope="scope_owner_id IS NULL")}) AS cell
            UNION ALL
            SELECT cell.* FROM generate_series(0, {SCOPE_BUCKETS - 1}) AS b (bucket)
            CROSS JOIN LATERAL ({lookup.format(scope="scope_owner_id = %s")}) AS cell
        ), counted AS (
            SELECT unnest(above_concepts) AS concept_id, unnest(above_units) AS units,
                   unnest(above_models) AS models, unnest(above_best) AS best
            FROM cells
            UNION ALL
            SELECT concept_id, 1, 0, iou
            FROM (SELECT unnest(unit_concepts) AS concept_id, unnest(unit_ious) AS iou FROM cells) cell_units
            WHERE iou >= %s
            UNION ALL
            SELECT concept_id, 0, 1, NULL
            FROM (SELECT unnest(model_concepts) AS concept_id, unnest(model_ious) AS iou FROM cells) cell_models
            WHERE iou >= %s
        ), k AS (
            SELECT concept_id, sum(units) AS units, sum(models) AS models, max(best) AS best_iou
            FROM counted GROUP BY concept_id HAVING sum(units) > 0
        )
        SELECT c.id, c.name, c.category, k.units, k.models, k.best_iou
        FROM k JOIN {Concept._meta.db_table} c ON c.id = k.concept_id
        {chosen}
        ORDER BY {order_by}"""
    t = float(min_iou)
    with connection.cursor() as cursor:
        cursor.execute(sql, [bar, t, user.pk, bar, t, t, t, *chosen_params])
        return [dict(zip(CONCEPT_FIELDS, row, strict=True)) for row in cursor.fetchall()]


def _concept_stat_bar(min_stability: float | None, max_p_value: float | None) -> str | None:
    """The ConceptStat bar that answers these filters, or None when the units must be counted."""
    stable = {None: False, STABLE_LABEL_MIN: True}.get(min_stability)
    significant = {None: False, SIGNIFICANT_P_MAX: True}.get(max_p_value)
    if stable is None or significant is None:
        return None
    return {
        (False, False): ConceptStat.Bar.ALL,
        (True, False): ConceptStat.Bar.STABLE,
        (False, True): ConceptStat.Bar.SIGNIFICANT,
        (True, True): ConceptStat.Bar.BOTH,
    }[(stable, significant)]


def concept_list_live(
    *,
    user,
    min_iou: float = DETECTOR_MIN_IOU,
    min_stability: float | None = None,
    max_p_value: float | None = None,
    concepts: QuerySet[Concept] | None = None,
) -> QuerySet[Concept]:
    """:func:`concept_list` counted from the units themselves, at any ``min_iou``, and only labels
    with ``stability >= min_stability`` and ``p_value <= max_p_value`` when given (units without
    evidence then do not count)."""
    concepts = Concept.objects.all() if concepts is None else concepts
    evidence = {}
    if min_stability is not None:
        evidence["labelled_units__stability__gte"] = min_stability
    if max_p_value is not None:
        evidence["labelled_units__p_value__lte"] = max_p_value
    return (
        concepts.filter(
            Q(labelled_units__job__owner=user) | Q(labelled_units__model__public=True),
            labelled_units__job__status=Job.Status.SUCCEEDED,
            labelled_units__iou__gte=min_iou,
            **evidence,
        )
        .annotate(
            units=Count("labelled_units"),
            models=Count("labelled_units__model", distinct=True),
            best_iou=Max("labelled_units__iou"),
        )
        .order_by("-units", "name", "id")
    )

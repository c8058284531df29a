"""A scope's summary rows for GET /api/concepts/ on Postgres, computed with numpy: the detector
counts (:class:`api.models.ConceptStatScope`) and the IoU cells that answer any other ``min_iou``
(:class:`api.models.ConceptIouCell`). The scope's labelled units come in by one binary COPY and
the rows go out by binary COPY: the same work in SQL (sorts, window sums, a dense concept x cell
table) took seconds per bucket of public models."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator

import numpy as np
from django.db import models

from api.models import (
    DETECTOR_MIN_IOU,
    IOU_CELL_UNITS,
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

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
# The labelled units as COPY BINARY sends them: a field count, then each field's length and value.
_UNIT_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("concept_length", ">i4"),
        ("concept", ">i8"),
        ("model_length", ">i4"),
        ("model", ">i8"),
        ("iou_length", ">i4"),
        ("iou", ">f8"),
        ("held_length", ">i4"),
        ("held", ">i4"),
    ]
)
_BARS = {  # bar -> the bits of `held` it needs (1: a stable label, 2: a significant one)
    ConceptStat.Bar.ALL.value: 0,
    ConceptStat.Bar.STABLE.value: 1,
    ConceptStat.Bar.SIGNIFICANT.value: 2,
    ConceptStat.Bar.BOTH.value: 3,
}
_STAT_FIELDS = ["bar", "scope_owner", "bucket", "concept", "units", "model_count", "best_iou"]
_CELL_FIELDS = ["bar", "scope_owner", "bucket", "lo", "above_concepts", "above_units", "above_models", "above_best"]
_CELL_FIELDS += ["unit_concepts", "unit_ious", "model_concepts", "model_ious"]


def scope_rows_write(cursor, *, owner: int | None, where: str, args: list) -> None:
    """Write one scope's ConceptStatScope and ConceptIouCell rows, every bar and bucket it holds,
    from its labelled units of succeeded jobs (``where`` over nd_model m and nd_job j chooses
    them, with ``args``); the caller deleted the old rows."""
    units = _labelled_units(cursor, where, args)
    # native, contiguous copies of the big-endian fields
    concepts, models_ = units["concept"].astype(np.int64), units["model"].astype(np.int64)
    ious, held = units["iou"].astype(np.float64), units["held"].astype(np.int64)
    buckets = models_ % SCOPE_BUCKETS
    stats: list[tuple] = []
    cells: list[tuple] = []
    for bar, bits in _BARS.items():
        in_bar = (held & bits) == bits
        for bucket in np.unique(buckets[in_bar]).tolist():
            chosen = in_bar & (buckets == bucket)
            c, x = concepts[chosen], ious[chosen]
            best_concepts, best_ious = _model_bests(c, models_[chosen], x)
            stats += [(bar, owner, bucket, *row) for row in _detectors(c, x, best_concepts, best_ious)]
            cells += [(bar, owner, bucket, *row) for row in _cells(c, x, best_concepts, best_ious)]
    _copy_in(cursor, ConceptStatScope, _STAT_FIELDS, stats)
    _copy_in(cursor, ConceptIouCell, _CELL_FIELDS, cells)


def _labelled_units(cursor, where: str, args: list) -> np.ndarray:
    """concept, model, IoU and bars (1 + 2 bits) of each labelled unit of the scope's succeeded jobs."""
    query = cursor.mogrify(
        f"""SELECT u.label_id::int8, u.model_id::int8, u.iou::float8,
                   (coalesce(u.stability >= {STABLE_LABEL_MIN!r}, false)::int
                    + 2 * coalesce(u.p_value <= {SIGNIFICANT_P_MAX!r}, false)::int)::int4
            FROM {NetworkModel._meta.db_table} m
            JOIN {Unit._meta.db_table} u ON u.model_id = m.id
            JOIN {Job._meta.db_table} j ON j.id = u.job_id
            WHERE j.status = %s AND u.label_id IS NOT NULL AND {where}""",
        [Job.Status.SUCCEEDED.value, *args],
    ).decode()
    buffer = io.BytesIO()
    cursor.cursor.copy_expert(f"COPY ({query}) TO STDOUT WITH BINARY", buffer)
    return np.frombuffer(buffer.getbuffer()[len(_COPY_HEADER) : -len(_COPY_TRAILER)], dtype=_UNIT_ROW)


def _model_bests(concepts: np.ndarray, models_: np.ndarray, ious: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each model's best unit per concept (concept, IoU): the last of each (concept, model) run by IoU."""
    order = np.lexsort((ious, models_, concepts))
    c, m = concepts[order], models_[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (c[1:] != c[:-1]) | (m[1:] != m[:-1])
    return c[last], ious[order][last]


def _detectors(
    concepts: np.ndarray, ious: np.ndarray, best_concepts: np.ndarray, best_ious: np.ndarray
) -> Iterator[tuple]:
    """Per concept with a unit at IoU >= DETECTOR_MIN_IOU: (concept, units, models, best IoU)."""
    found = ious >= DETECTOR_MIN_IOU
    ids, index = np.unique(concepts[found], return_inverse=True)
    units = np.bincount(index, minlength=len(ids))
    models_ = np.bincount(np.searchsorted(ids, best_concepts[best_ious >= DETECTOR_MIN_IOU]), minlength=len(ids))
    best = np.full(len(ids), -np.inf)
    np.maximum.at(best, index, ious[found])
    return zip(ids.tolist(), units.tolist(), models_.tolist(), best.tolist(), strict=True)


def _cells(concepts: np.ndarray, ious: np.ndarray, best_concepts: np.ndarray, best_ious: np.ndarray) -> Iterator[tuple]:
    """The cells of one bar and bucket, lowest first: (lo; above it per concept: concepts, units,
    models, best IoU; the cell's units: concepts, IoUs; its model bests: concepts, IoUs).

    Bounds at every ~IOU_CELL_UNITS-th IoU (distinct: tied IoUs share a cell); a unit with IoU x
    lies in cell k = the number of bounds <= x, which holds [lo[k], lo[k + 1]).
    """
    n = len(ious)
    count = -(-n // IOU_CELL_UNITS)
    bounds = np.unique(np.sort(ious)[(np.arange(1, count) * n) // count])
    cell = np.searchsorted(bounds, ious, side="right")
    best_cell = np.searchsorted(bounds, best_ious, side="right")
    ids, index = np.unique(concepts, return_inverse=True)
    best_index = np.searchsorted(ids, best_concepts)
    cells, width = len(bounds) + 1, len(ids)
    # Per cell (rows) and concept (columns): its units, model bests and best IoU in the cell (a
    # concept's best unit is one model's best).
    units_in = np.bincount(cell * width + index, minlength=cells * width).reshape(cells, width)
    models_in = np.bincount(best_cell * width + best_index, minlength=cells * width).reshape(cells, width)
    best_in = np.full(cells * width, -np.inf)
    np.maximum.at(best_in, best_cell * width + best_index, best_ious)
    best_in = best_in.reshape(cells, width)
    # Above cell k: the sums (and max) over cells k + 1 and up.
    units_above, models_above = np.zeros_like(units_in), np.zeros_like(models_in)
    units_above[:-1] = np.cumsum(units_in[:0:-1], axis=0)[::-1]
    models_above[:-1] = np.cumsum(models_in[:0:-1], axis=0)[::-1]
    best_above = np.full(best_in.shape, -np.inf)
    best_above[:-1] = np.maximum.accumulate(best_in[:0:-1], axis=0)[::-1]

    unit_order = np.lexsort((concepts, -ious, cell))  # by cell, then best first
    unit_starts = np.searchsorted(cell[unit_order], np.arange(cells + 1))
    model_order = np.lexsort((best_concepts, -best_ious, best_cell))
    model_starts = np.searchsorted(best_cell[model_order], np.arange(cells + 1))
    for k in range(cells):
        present = np.flatnonzero(units_above[k])
        units = unit_order[unit_starts[k] : unit_starts[k + 1]]
        bests = model_order[model_starts[k] : model_starts[k + 1]]
        yield (
            -np.inf if k == 0 else float(bounds[k - 1]),
            ids[present],
            units_above[k, present],
            models_above[k, present],
            best_above[k, present],
            concepts[units],
            ious[units],
            best_concepts[bests],
            best_ious[bests],
        )


# ---------------------------------------------------------------- COPY BINARY out of rows

_SCALARS = {"smallint": ">h", "integer": ">i", "bigint": ">q", "double precision": ">d"}
_ELEMENTS = {"integer": (23, ">i4"), "bigint": (20, ">i8"), "double precision": (701, ">f8")}  # type oid, format


def _copy_in(cursor, model: type[models.Model], fields: list[str], rows: Iterable[tuple]) -> None:
    """Rows (values in ``fields`` order; arrays as numpy arrays) into a table by COPY BINARY,
    each value encoded as its column's Postgres type."""
    encoders = [_encoder(model._meta.get_field(name), cursor.db) for name in fields]
    out = io.BytesIO()
    out.write(_COPY_HEADER)
    count = struct.pack(">h", len(fields))
    for row in rows:
        out.write(count)
        for encode, value in zip(encoders, row, strict=True):
            data = None if value is None else encode(value)
            out.write(struct.pack(">i", -1) if data is None else struct.pack(">i", len(data)) + data)
    out.write(_COPY_TRAILER)
    out.seek(0)
    ops = cursor.db.ops
    columns = ", ".join(ops.quote_name(model._meta.get_field(name).column) for name in fields)
    cursor.cursor.copy_expert(f"COPY {ops.quote_name(model._meta.db_table)} ({columns}) FROM STDIN WITH BINARY", out)


def _encoder(field, connection):
    kind = (field.target_field.rel_db_type(connection) if field.is_relation else field.db_type(connection)) or ""
    if kind.endswith("[]"):
        oid, element = _ELEMENTS[kind[:-2]]
        return lambda values: _array(values, oid, element)
    if kind in _SCALARS:
        return struct.Struct(_SCALARS[kind]).pack
    if kind.startswith("varchar") or kind == "text":
        return str.encode
    raise TypeError(f"no COPY BINARY encoding for {field.name} ({kind})")


def _array(values: np.ndarray, oid: int, element: str) -> bytes:
    """A one-dimensional array without nulls as Postgres sends it (array_send)."""
    if len(values) == 0:
        return struct.pack(">iii", 0, 0, oid)
    items = np.empty(len(values), dtype=[("length", ">i4"), ("value", element)])
    items["length"] = np.dtype(element).itemsize
    items["value"] = values
    return struct.pack(">iiiii", 1, 0, oid, len(values), 1) + items.tobytes()

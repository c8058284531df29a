"""``GET /api/units/`` at the speed of its SQL (Postgres).

The unit list is the query other services call most (every unit of a concept across every
model, best first). Through the ORM and the serializers a page of 100 units cost about
18 ms in process, most of it building model instances and serializing them field by field,
while its SQL takes about 2 ms. Here the same page is one prepared statement: Postgres
filters, orders and limits the units and returns each one as the JSON object the serializer
would give (:class:`api.serializers.UnitSerializer`, same fields, values and order of units),
top concepts included; Python only joins the rows into the page. That JSON is written with
the unit (``Unit.page_json``, by the row trigger of migration 0019 through the SQL function
``nd_unit_page_json``), so a page reads one column per unit; where it is empty (a unit stored
before 0019, or one without its own top concepts) the same function builds it at read time. Which units the user may
see it reads from each unit's row (``Unit.audience``, kept by triggers from the job's status
and the model's publicity), not by joining every unit to its job and model: those two
lookups per unit were about two thirds of the statement.

What stays the general path's (``UnitViewSet.list``): a database other than Postgres, a
renderer other than JSON (the browsable API) and any ``?ordering=``. The filters are
:class:`api.filters.UnitFilter`'s, cleaned as its form cleans them (same 400s), and the
cursor is DRF's own :class:`~rest_framework.pagination.CursorPagination` logic, run over
:class:`PageQuery` rather than a queryset, so ``next``/``previous`` links are the ones the
general path gives.

The request itself can skip DRF's dispatch too (:func:`lean_response`, routed ahead of the
viewset by ``api.views.unit_list``): a plain JSON read (``Accept`` absent, ``*/*`` or
``application/json``; no ``?format=``, no ``?ordering=``) with a token that authenticates,
valid filters and cursor, is answered here with the headers DRF gives it. Every other request
(no token or a refused one, a 400 or 404, the browsable API, a session user, any method but
GET) goes through ``UnitViewSet`` as before, so its answers and errors are DRF's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

import django_filters
from django.db import connection
from django.http import HttpResponse
from rest_framework.exceptions import NotFound, ValidationError

from api import prepared
from api.authentication import token_user
from api.filters import UnitFilter
from api.models import Unit
from api.pagination import UnitPagination


# UnitFilter's filters as SQL over nd_unit u (and nd_concept lc, joined only for category).
def _row_id(value) -> int:
    """An id filter's value as the ORM takes it (int() of the decimal); one past bigint matches
    nothing (ids are positive), rather than overflowing in the database."""
    number = int(value)
    return number if -(2**63) <= number < 2**63 else -1


_FILTER_SQL = {
    "model": ("u.model_id = {}", _row_id),
    "job": ("u.job_id = {}", _row_id),
    "layer": ("u.layer = {}", str),
    "concept": ("u.label_name = {}", str),
    "category": ("lc.category = {}", str),
    "min_iou": ("u.iou >= {}", float),  # a decimal's nearest double: what the ORM compares
    "min_stability": ("u.stability >= {}", float),
    "max_p_value": ("u.p_value <= {}", float),
}
# A filter added to UnitFilter must be given its SQL here (the lean path must not ignore it).
assert set(_FILTER_SQL) == set(UnitFilter.base_filters), "api.unit_page._FILTER_SQL must cover UnitFilter"
_NUMBERS = {name for name, f in UnitFilter.base_filters.items() if isinstance(f, django_filters.NumberFilter)}
_ORDER_COLUMNS = {"iou": "u.iou", "id": "u.id"}
_CAST = {"iou": float, "id": int}
_COMPARE = {"lt": "<", "gt": ">"}


class Row(NamedTuple):
    """One unit of a page: what the cursor reads (its ordering fields) and its JSON (a tuple:
    101 of them per page, built at C speed rather than through a dataclass's __init__)."""

    id: int
    iou: float
    json: str


@dataclass(frozen=True)
class PageQuery:
    """The slice of the queryset API that CursorPagination uses (order_by, filter on the first
    ordering field, one slice), compiled to one prepared statement."""

    user_id: int
    filters: tuple[tuple[str, object], ...]
    ordering: tuple[str, ...] = ()
    bounds: tuple[tuple[str, str, object], ...] = ()

    def order_by(self, *fields: str) -> PageQuery:
        return replace(self, ordering=fields)

    def filter(self, **lookups) -> PageQuery:
        bounds = list(self.bounds)
        for lookup, value in lookups.items():
            field, op = lookup.split("__")
            bounds.append((field, op, _CAST[field](value)))
        return replace(self, bounds=tuple(bounds))

    def __getitem__(self, window: slice) -> list[Row]:
        offset, stop = window.start or 0, window.stop
        # Visible: the job succeeded, and it is the user's or the model is public (the general
        # path's rule, api.selectors.unit_list), read from the unit's copy (Unit.audience).
        clauses = ["u.audience IN (0, {})"]
        args: list[object] = [self.user_id]
        joins = ""
        for name, value in self.filters:
            template, cast = _FILTER_SQL[name]
            clauses.append(template)
            args.append(cast(value))
            if name == "category":
                joins = " JOIN nd_concept lc ON lc.id = u.label_id"
        for field, op, value in self.bounds:
            clauses.append(f"{_ORDER_COLUMNS[field]} {_COMPARE[op]} {{}}")
            args.append(value)
        order = ", ".join(
            f"{_ORDER_COLUMNS[f.lstrip('-')]}{' DESC' if f.startswith('-') else ''}" for f in self.ordering
        )
        outer_order = order.replace("u.", "p.")
        args += [stop - offset, offset]
        where = " AND ".join(clauses)
        table = Unit._meta.db_table
        sql = (
            # The JSON written with the unit, else built now (only then is the row read again).
            f"SELECT p.id, p.iou, CASE WHEN p.page_json <> '' THEN p.page_json"
            f" ELSE (SELECT nd_unit_page_json(x) FROM {table} x WHERE x.id = p.id) END FROM ("
            f"SELECT u.id, u.iou, u.page_json FROM {table} u{joins} WHERE {where}"
            f" ORDER BY {order} LIMIT {{}} OFFSET {{}}) p"
            f" ORDER BY {outer_order}"
        )
        return list(map(Row._make, prepared.execute("units", sql, args)))


def applies(request, view) -> bool:
    """Whether this request can take the lean path (see the module's docstring)."""
    return (
        connection.vendor == "postgresql"
        and getattr(request, "accepted_renderer", None) is not None
        and request.accepted_renderer.format == "json"
        and "ordering" not in request.query_params
    )


def list_response(request, view) -> HttpResponse:
    """The page of units that ``UnitViewSet.list`` would give, as one prepared statement."""
    return HttpResponse(_page(request.query_params, request, request.user.pk), content_type="application/json")


# What DRF's dispatch adds to the viewset's list answer (APIView.default_response_headers: the
# route's methods, and Vary since the viewset has two renderers); tests compare both routes.
_HEADERS = {"Vary": "Accept", "Allow": "GET, HEAD, OPTIONS"}
_ACCEPT_JSON = frozenset({"", "*/*", "application/json"})  # what DRF answers with JSONRenderer as is


class _PagerRequest:
    """What UnitPagination reads of a request (DRF's ``query_params``, the absolute URI)."""

    def __init__(self, request) -> None:
        self.query_params = request.GET
        self.build_absolute_uri = request.build_absolute_uri


def lean_response(request) -> HttpResponse | None:
    """The unit list's answer without DRF's dispatch, or None where the request must take it
    (see the module's docstring): same body and headers as ``UnitViewSet.list`` through DRF."""
    if request.method != "GET" or connection.vendor != "postgresql":
        return None
    params = request.GET
    if request.META.get("HTTP_ACCEPT", "").strip() not in _ACCEPT_JSON or "format" in params or "ordering" in params:
        return None
    user = token_user(request)
    if user is None:
        return None
    try:
        body = _page(params, _PagerRequest(request), user.pk)
    except (ValidationError, NotFound):  # DRF's path answers them in the API's error shape
        return None
    request.user = user  # as DRF's Request sets it on the request it wraps
    response = HttpResponse(body, content_type="application/json")
    for name, value in _HEADERS.items():
        response[name] = value
    return response


def _page(params, pager_request, user_id: int) -> bytes:
    """The page's JSON: DRF's cursor links around the units' stored JSON."""
    filters = _filters(params)
    paginator = UnitPagination()
    # No ?ordering= here (both callers check), so the pagination's own ordering: no view needed.
    rows = paginator.paginate_queryset(PageQuery(user_id=user_id, filters=filters), pager_request, view=None)
    links = json.dumps({"next": paginator.get_next_link(), "previous": paginator.get_previous_link()})
    return (links[:-1] + ', "results": [' + ", ".join(row.json for row in rows) + "]}").encode()


def _filters(params) -> tuple[tuple[str, object], ...]:
    """UnitFilter's filters present in the query, cleaned as its form fields clean them (numbers:
    finite decimals, else 400 "Enter a number."; text stripped; empty values ignored), without
    building the form (which took as long as the query)."""
    found = []
    errors = {}
    for name in _FILTER_SQL:
        raw = params.get(name)
        if raw is None or not str(raw).strip():
            continue
        value = str(raw).strip()
        if "\x00" in value:  # what Django's form fields say (ProhibitNullCharactersValidator)
            errors[name] = ["Null characters are not allowed."]
            continue
        if name in _NUMBERS:
            try:
                number = Decimal(value)
            except InvalidOperation:
                number = None
            if number is None or not number.is_finite():
                errors[name] = ["Enter a number."]
                continue
            found.append((name, number))
        else:
            found.append((name, value))
    if errors:
        raise ValidationError(errors)
    return tuple(found)

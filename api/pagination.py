"""Limit/offset pagination with bounds: a huge ``?limit=`` or ``?offset=`` reads a page, never
overflows the database's bigint LIMIT/OFFSET; and the unit list's cursor pagination."""

from __future__ import annotations

import math

from rest_framework import pagination
from rest_framework.exceptions import NotFound

MAX_LIMIT = 1000
MAX_OFFSET = 2**62


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    max_limit = MAX_LIMIT

    def get_offset(self, request) -> int:
        return min(super().get_offset(request), MAX_OFFSET)


class UnitPagination(pagination.CursorPagination):
    ordering = ("-iou", "id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000

    def decode_cursor(self, request):
        """DRF's cursor, with its position checked against the ordering field (a finite IoU, an
        integer id): a crafted position is an invalid cursor (404), not a database error."""
        cursor = super().decode_cursor(request)
        if cursor is None or cursor.position is None:
            return cursor
        field = self.ordering[0].lstrip("-")
        try:
            value = int(cursor.position) if field == "id" else float(cursor.position)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            raise NotFound(self.invalid_cursor_message)
        return cursor

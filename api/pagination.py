"""Limit/offset pagination with bounds: a huge ``?limit=`` or ``?offset=`` reads a page, never
overflows the database's bigint LIMIT/OFFSET."""

from __future__ import annotations

from rest_framework import pagination

MAX_LIMIT = 1000
MAX_OFFSET = 2**62


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    max_limit = MAX_LIMIT

    def get_offset(self, request) -> int:
        return min(super().get_offset(request), MAX_OFFSET)

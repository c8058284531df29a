"""Per-user rate limit on API writes (settings.API_WRITE_RATE), answered 429 with Retry-After."""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class WriteRateThrottle(SimpleRateThrottle):
    """Counts each authenticated user's POST, PUT, PATCH and DELETE requests; reads are free."""

    scope = "writes"

    def get_rate(self) -> str | None:
        return settings.API_WRITE_RATE or None

    def allow_request(self, request, view) -> bool:
        self.rate = self.get_rate()  # read per request: a deployment (or a test) may change it
        if self.rate is None:
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)

    def get_cache_key(self, request, view) -> str | None:
        if request.method in SAFE_METHODS or not (request.user and request.user.is_authenticated):
            return None
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}

"""HTTP clients over loopback that record every answer: latency per endpoint, 5xx, lost connections."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import requests


@dataclass
class Sample:
    endpoint: str
    method: str
    path: str
    status: int  # 0: no answer (connection refused or reset, timeout)
    seconds: float
    at: float
    body: str = ""


@dataclass
class Recorder:
    """Every request's endpoint, status and latency, from any number of threads."""

    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample) -> None:
        with self.lock:
            self.samples.append(sample)

    def between(self, start: float, stop: float) -> list[Sample]:
        with self.lock:
            return [s for s in self.samples if start <= s.at < stop]

    def snapshot(self) -> list[Sample]:
        with self.lock:
            return list(self.samples)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency_table(samples: list[Sample]) -> list[dict]:
    """Per endpoint: count, 5xx, no answer, p50, p95, max (seconds) over the answered requests."""
    by: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by[s.endpoint].append(s)
    rows = []
    for endpoint in sorted(by):
        group = by[endpoint]
        times = [s.seconds for s in group if s.status]
        rows.append(
            {
                "endpoint": endpoint,
                "count": len(group),
                "5xx": sum(1 for s in group if s.status >= 500),
                "no_answer": sum(1 for s in group if s.status == 0),
                "p50": percentile(times, 50),
                "p95": percentile(times, 95),
                "max": max(times) if times else float("nan"),
            }
        )
    return rows


class Client:
    """One user's HTTP session: ``client.get("jobs.retrieve", f"/api/jobs/{id}/")``.

    Failed connections are recorded (status 0) and returned as None, never raised.
    """

    def __init__(self, base: str, token: str | None, recorder: Recorder | None = None, timeout: float = 60) -> None:
        self.base = base
        self.recorder = recorder
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Token {token}"

    def request(self, method: str, endpoint: str, path: str, **kwargs) -> requests.Response | None:
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("allow_redirects", False)
        start = time.monotonic()
        try:
            response = self.session.request(method, self.base + path, **kwargs)
        except requests.RequestException as exc:
            if self.recorder is not None:
                self.recorder.add(
                    Sample(endpoint, method, path, 0, time.monotonic() - start, start, type(exc).__name__)
                )
            return None
        if self.recorder is not None:
            body = response.text[:300] if response.status_code >= 500 else ""
            self.recorder.add(
                Sample(endpoint, method, path, response.status_code, time.monotonic() - start, start, body)
            )
        return response

    def get(self, endpoint: str, path: str, **kwargs) -> requests.Response | None:
        return self.request("GET", endpoint, path, **kwargs)

    def post(self, endpoint: str, path: str, **kwargs) -> requests.Response | None:
        return self.request("POST", endpoint, path, **kwargs)

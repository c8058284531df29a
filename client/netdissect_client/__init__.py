"""Python client of the network dissection service (standard library and numpy only).

    from netdissect_client import Client

    client = Client("http://127.0.0.1:8000", token)
    model = client.register_model(name="r18", arch="torchvision:resnet18", num_classes=365,
                                  weights="resnet18.safetensors")
    dataset = client.register_dataset(name="broden", format="broden", path="/data/broden1_224")
    job = client.wait(client.submit("dissect", model=model["id"], dataset=dataset["id"],
                                    params={"layers": ["layer4"]})["id"])
    for unit in client.units(job=job["id"], min_stability=0.9):
        print(unit["unit"], unit["label"], unit["iou"])
    matrix = client.matrix(job["id"], "layer4")

Creates carry an ``Idempotency-Key`` (a fresh UUID per call unless you pass one), so the
client retries them safely after a timeout, a 503 or a 429 (honouring ``Retry-After``).
:func:`verify_signature` checks a webhook's ``X-Netdissect-Signature``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ApiError", "Client", "JobFailed", "Matrix", "verify_signature"]

FINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """An error answer of the service: its HTTP status, message and details."""

    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.extra = extra or {}


class JobFailed(Exception):
    """A job that ended failed or cancelled (``job`` holds its resource)."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job['id']} {job['status']}: {job.get('error') or ''}".strip())
        self.job = job


@dataclass
class Matrix:
    """One layer's unit x concept IoU matrix (``iou[u, c]`` is unit u, concept c)."""

    iou: np.ndarray
    thresholds: np.ndarray
    concept_names: list[str]
    concept_categories: list[str]
    iou_low: np.ndarray | None = None
    iou_high: np.ndarray | None = None


def verify_signature(secret: str, header: str, body: bytes, tolerance: float = 300.0) -> bool:
    """Whether a webhook's ``X-Netdissect-Signature`` header signs ``body`` under ``secret``, sent
    within ``tolerance`` seconds of now."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) <= tolerance
    except (KeyError, ValueError):
        return False


class Client:
    """The service at ``base_url`` (e.g. ``http://127.0.0.1:8000``) with an API token.

    Args:
        base_url: the service's root URL.
        token: an API token (the dashboard's /token/ page, or ``manage.py drf_create_token``).
        timeout: seconds per HTTP request.
        retries: attempts for a request that meets a connection error, a 503 or a 429.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 60.0, retries: int = 5) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries

    # -- HTTP ------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        json_body: Any = None,
        files: Mapping[str, Path] | None = None,
        fields: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        head = {"Authorization": f"Token {self.token}", "Accept": "application/json", **(headers or {})}
        data = None
        if files is not None:
            data, head["Content-Type"] = _multipart(fields or {}, files)
        elif json_body is not None:
            data, head["Content-Type"] = json.dumps(json_body).encode(), "application/json"
        for attempt in range(self.retries):
            request = urllib.request.Request(url, data=data, method=method, headers=head)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.status, response.read(), response.headers
            except urllib.error.HTTPError as exc:
                body = exc.read()
                if exc.code in (429, 503) and attempt + 1 < self.retries:
                    time.sleep(float(exc.headers.get("Retry-After") or 2**attempt))
                    continue
                try:
                    error = json.loads(body)
                except ValueError:
                    error = {"message": body.decode(errors="replace")[:300]}
                raise ApiError(exc.code, error.get("message", ""), error.get("extra")) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if attempt + 1 == self.retries:
                    raise
                time.sleep(2**attempt)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return json.loads(self._request(method, path, **kwargs)[1])

    def get(self, path: str, **query: Any) -> Any:
        """GET any API path (e.g. ``/api/jobs/1/``) and decode its JSON."""
        return self._json("GET", path, query=query or None)

    def post(self, path: str, body: Any = None, *, idempotency_key: str | None = None) -> Any:
        """POST a JSON body to any API path and decode the JSON answer (with an
        ``Idempotency-Key`` when given)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", path, json_body=body if body is not None else {}, headers=headers)

    # -- registering -----------------------------------------------------------------------

    def register_model(
        self,
        *,
        name: str,
        arch: str,
        weights: str | Path | None = None,
        weights_path: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Register a model, uploading ``weights`` (a local file) or naming ``weights_path`` (a file
        on the server, inside its DATA_ROOTS). Other fields: num_classes, input_size, mean, std,
        classes, public, kind (see the API's schema)."""
        key = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        if weights is not None:
            form = {"name": name, "arch": arch, **{k: _form_value(v) for k, v in fields.items()}}
            return self._json("POST", "/api/models/", files={"weights": Path(weights)}, fields=form, headers=key)
        body = {"name": name, "arch": arch, "weights_path": weights_path, **fields}
        return self._json("POST", "/api/models/", json_body=body, headers=key)

    def register_dataset(
        self, *, name: str, format: str, path: str, idempotency_key: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Register a dataset folder on the server (``format``: broden, synthetic, imagefolder, ...)."""
        key = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        body = {"name": name, "format": format, "path": path, **fields}
        return self._json("POST", "/api/datasets/", json_body=body, headers=key)

    # -- jobs ------------------------------------------------------------------------------

    def submit(
        self,
        type: str,
        *,
        model: int,
        dataset: int | None = None,
        params: Mapping[str, Any] | None = None,
        callback_url: str | None = None,
        callback_progress: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit a job (202); returns its resource."""
        body: dict[str, Any] = {"type": type, "model": model, "params": dict(params or {})}
        if dataset is not None:
            body["dataset"] = dataset
        if callback_url:
            body["callback_url"] = callback_url
        if callback_progress is not None:
            body["callback_progress"] = callback_progress
        key = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return self._json("POST", "/api/jobs/", json_body=body, headers=key)

    def job(self, job_id: int) -> dict[str, Any]:
        """A job's resource now."""
        return self._json("GET", f"/api/jobs/{job_id}/")

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Cancel a queued or running job."""
        return self._json("POST", f"/api/jobs/{job_id}/cancel/")

    def wait(
        self, job_id: int, *, poll: float = 2.0, timeout: float | None = None, progress: bool = True
    ) -> dict[str, Any]:
        """Wait for a job to end, showing its progress on stderr; returns the succeeded job.

        Raises:
            JobFailed: the job failed or was cancelled.
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Progress(job_id) if progress else None
        try:
            while True:
                job = self.job(job_id)
                if bar is not None:
                    bar.update(job)
                if job["status"] in FINAL:
                    if job["status"] != "succeeded":
                        raise JobFailed(job)
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    # -- results ---------------------------------------------------------------------------

    def units(self, *, page_size: int = 500, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every unit matching the filters (model, job, layer, concept, category, min_iou,
        min_stability, max_p_value, ordering), across pages."""
        page = self._json("GET", "/api/units/", query={"page_size": page_size, **filters})
        while True:
            yield from page["results"]
            if not page.get("next"):
                return
            page = self._json("GET", page["next"])

    def concepts(self, *, limit: int = 500, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every concept that labels visible units (filters: category, name, min_iou,
        min_stability, max_p_value, ordering), across pages."""
        page = self._json("GET", "/api/concepts/", query={"limit": limit, **filters})
        while True:
            yield from page["results"]
            if not page.get("next"):
                return
            page = self._json("GET", page["next"])

    def matrix(self, job_id: int, layer: str) -> Matrix:
        """One dissected layer's full unit x concept IoU matrix (with its intervals when the job
        computed them)."""
        raw = self._request("GET", f"/api/jobs/{job_id}/matrix/", query={"layer": layer, "as": "npz"})[1]
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            return Matrix(
                iou=data["iou"],
                thresholds=data["thresholds"],
                concept_names=[str(n) for n in data["concept_names"]],
                concept_categories=[str(c) for c in data["concept_categories"]],
                iou_low=data["iou_low"] if "iou_low" in data.files else None,
                iou_high=data["iou_high"] if "iou_high" in data.files else None,
            )

    def webhook_secret(self) -> str:
        """Your webhook signing secret."""
        return self._json("GET", "/api/webhook-secret/")["secret"]


class _Progress:
    """A progress bar on stderr: tqdm when installed, else one line rewritten in place."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=100, desc=f"job {job_id}", unit="%", file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, job: dict[str, Any]) -> None:
        done = round(100 * float(job.get("progress") or 0.0))
        text = f"{job['status']} {job.get('phase') or ''}".strip()
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(done - self.bar.n)
        else:
            sys.stderr.write(f"\rjob {self.job_id}: {done:3d}% {text}   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


def _form_value(value: Any) -> str:
    return (
        json.dumps(value)
        if isinstance(value, (list, dict))
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def _multipart(fields: Mapping[str, Any], files: Mapping[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(path.read_bytes())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"

"""Webhooks delivered by a real worker to a real HTTP receiver on loopback: signed (verified by
the code docs/api.md shows), retried until the receiver answers 2xx, visible on the job;
refused addresses are a 400 at submission."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import register, wait_final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]
ROOT = Path(__file__).resolve().parents[2]


def _verify_from_the_docs():
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", text, re.S).group(1)
    space: dict = {}
    exec(code, space)
    return space["verify"]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers ``codes`` in turn, then 200."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = list(codes)
        self.calls: list[tuple[dict, bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = receiver.codes.pop(0) if receiver.codes else 200
                receiver.calls.append((dict(self.headers), body, code))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?from=netdissect"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_job_end_is_delivered_signed_after_retries(api, celery_worker_process, scenes, demo_weights):
    verify = _verify_from_the_docs()
    receiver = Receiver([500, 500])
    try:
        model, dataset = register(api, scenes, demo_weights)
        secret = api.get("/api/webhook-secret/").json()["secret"]
        response = api.post(
            "/api/jobs/",
            {
                "type": "dissect",
                "model": model["id"],
                "dataset": dataset["id"],
                "params": {"layers": ["conv5"]},
                "callback_url": receiver.url,
            },
            format="json",
        )
        assert response.status_code == 202, response.json()
        job = wait_final(api, response.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        deadline = time.monotonic() + 60
        while len(receiver.calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [code for _, _, code in receiver.calls] == [500, 500, 200]
        deliveries = {headers["X-Netdissect-Delivery"] for headers, _, _ in receiver.calls}
        assert len(deliveries) == 1
        for headers, body, _ in receiver.calls:
            assert headers["X-Netdissect-Event"] == "succeeded"
            assert verify(secret, headers["X-Netdissect-Signature"], body)
            assert not verify(secret, headers["X-Netdissect-Signature"], body + b" ")
            assert not verify("another secret", headers["X-Netdissect-Signature"], body)
            sent = json.loads(body)
            assert sent["id"] == job["id"] and sent["status"] == "succeeded"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shown = api.get(f"/api/jobs/{job['id']}/").json()["deliveries"]
            if shown and shown[0]["delivered"]:
                break
            time.sleep(0.2)
        assert [(d["event"], d["attempts"], d["status_code"], d["delivered"]) for d in shown] == [
            ("succeeded", 3, 200, True)
        ]
        assert shown[0]["delivery"] == deliveries.pop()
        # a new secret: the old one no longer verifies what is signed from now on
        assert api.post("/api/webhook-secret/").json()["secret"] != secret
    finally:
        receiver.close()


def test_refused_callback_addresses_are_a_400(api, scenes, demo_weights, settings):
    model, dataset = register(api, scenes, demo_weights)

    def submit(url: str, **extra):
        body = {"type": "dissect", "model": model["id"], "dataset": dataset["id"], "callback_url": url, **extra}
        return api.post("/api/jobs/", body, format="json")

    for url in ("http://169.254.169.254/latest/meta-data", "http://10.1.2.3/hook", "ftp://example.org/x"):
        response = submit(url)
        assert response.status_code == 400 and "callback_url" in response.json()["message"], url
    settings.WEBHOOK_ALLOWED_NETWORKS = []
    response = submit("http://127.0.0.1:9/hook")
    assert response.status_code == 400 and "loopback" in response.json()["message"]
    response = submit("", callback_progress=10)
    assert response.status_code == 400 and "callback_progress needs a callback_url" in response.json()["message"]


def test_progress_steps(user):
    from api.models import Job
    from api.services.webhooks import progress_crossed

    job = Job(callback_url="http://example.org/", callback_progress=25)
    assert progress_crossed(job, 0.2, 0.26) and progress_crossed(job, 0.1, 0.8)
    assert not progress_crossed(job, 0.26, 0.49) and not progress_crossed(job, 0.9, 1.0)
    assert not progress_crossed(Job(callback_url="http://example.org/"), 0.0, 0.9)

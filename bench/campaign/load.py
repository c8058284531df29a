"""Load: many concurrent clients submit jobs, poll them, query units, concepts and results.

Each client is one thread with its own session and seed, acting for alice or bob: at most two
jobs of its own in flight, polling them, cancelling one now and then, and reading lists,
units, unit images, IoU matrices, layer summaries and concepts, with a short think time. Every
job is submitted with an Idempotency-Key, and a third of the submissions are sent again with
the same key, as a client retrying after a timeout would: the retry must answer the same job.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

from bench.campaign.clients import Recorder, latency_table, percentile
from bench.campaign.harness import FINAL, Harness

OK = {200, 201, 202}
PAINT = "POST /api/models/{id}/paint/"


class LoadClient(threading.Thread):
    def __init__(self, h: Harness, index: int, recorder: Recorder, stop_at: float) -> None:
        super().__init__(name=f"load-{index}", daemon=True)
        self.h = h
        self.user = "bob" if index % 3 == 2 else "alice"
        self.rng = random.Random(h.options.seed * 1000 + index)
        self.api = h.client(self.user, recorder)
        self.stop_at = stop_at
        self.accepted: list[int] = []
        self.cancelled: list[int] = []  # cancel answered 200
        self.unexpected: list[str] = []
        self.inflight: list[int] = []
        self.succeeded: list[int] = []
        self.units: list[int] = []
        self.retried = 0  # submissions sent twice with one Idempotency-Key
        self.retry_mismatch: list[str] = []

    def expect(self, response, allowed=OK) -> bool:
        if response is None:
            return False
        if response.status_code not in allowed:
            self.unexpected.append(
                f"{response.request.method} {response.request.path_url} -> {response.status_code} {response.text[:120]}"
            )
            return False
        return True

    def step(self) -> None:
        h, api, rng, fx = self.h, self.api, self.rng, self.h.fixtures
        model = fx.model[self.user]["id"]
        r = rng.random()
        if len(self.inflight) < 2 and r < 0.12:
            body = h.dissect_body(self.user, rng, sharded=rng.random() < 0.1)
            key = {"Idempotency-Key": str(uuid.UUID(int=rng.getrandbits(128)))}
            response = api.post("POST /api/jobs/", "/api/jobs/", json=body, headers=key)
            if self.expect(response):
                self.accepted.append(response.json()["id"])
                self.inflight.append(response.json()["id"])
                if rng.random() < 1 / 3:
                    self.retried += 1
                    again = api.post("POST /api/jobs/ (retry, same key)", "/api/jobs/", json=body, headers=key)
                    if self.expect(again) and again.json()["id"] != response.json()["id"]:
                        self.retry_mismatch.append(f"{response.json()['id']} then {again.json()['id']}")
        elif self.inflight and r < 0.50:
            job_id = rng.choice(self.inflight)
            response = api.get("GET /api/jobs/{id}/", f"/api/jobs/{job_id}/")
            if self.expect(response) and response.json()["status"] in FINAL:
                self.inflight.remove(job_id)
                if response.json()["status"] == "succeeded":
                    self.succeeded.append(job_id)
        elif r < 0.58:
            status = rng.choice(("succeeded", "running", "queued"))
            self.expect(api.get("GET /api/jobs/", f"/api/jobs/?status={status}&limit=20"))
        elif r < 0.70:
            layer = rng.choice(fx.conv_layers)
            response = api.get("GET /api/units/", f"/api/units/?model={model}&layer={layer}&page_size=50")
            if self.expect(response):
                self.units = [row["id"] for row in response.json()["results"]][:20] or self.units
        elif r < 0.76 and self.units:
            self.expect(api.get("GET /api/units/{id}/", f"/api/units/{rng.choice(self.units)}/"))
        elif r < 0.79 and self.units:
            # A unit of a job without top images has none (404): only ask where images were made.
            response = api.get("GET /api/units/{id}/image/", f"/api/units/{rng.choice(self.units)}/image/")
            self.expect(response, OK | {404})
        elif r < 0.83:
            self.expect(api.get("GET /api/models/{id}/layers/", f"/api/models/{model}/layers/"))
        elif r < 0.87:
            self.expect(api.get("GET /api/concepts/", "/api/concepts/?limit=20"))
        elif r < 0.89:
            self.expect(api.get("GET /api/models/", "/api/models/"))
        elif r < 0.91:
            self.expect(api.get("GET /api/datasets/", "/api/datasets/"))
        elif r < 0.93 and self.succeeded:
            job_id = rng.choice(self.succeeded)
            layer = self._a_layer(job_id)
            if layer:
                self.expect(api.get("GET /api/jobs/{id}/matrix/", f"/api/jobs/{job_id}/matrix/?layer={layer}"))
        elif r < 0.945 and self.user == "alice" and fx.paint_concept:
            mask = [[1 if 1 <= x < 3 and 1 <= y < 3 else 0 for x in range(4)] for y in range(4)]
            self.expect(
                api.post(
                    PAINT,
                    f"/api/models/{fx.generator['id']}/paint/",
                    json={
                        "layer": "layer3",
                        "concept": fx.paint_concept,
                        "mask": mask,
                        "seed": rng.randrange(1000),
                        "k": 4,
                    },
                )
            )
        elif r < 0.96:
            self.expect(api.get("GET /api/health/", "/api/health/"))
        elif r < 0.975 and self.inflight:
            job_id = rng.choice(self.inflight)
            response = api.post("POST /api/jobs/{id}/cancel/", f"/api/jobs/{job_id}/cancel/")
            if self.expect(response, {200, 409}) and response.status_code == 200:
                self.cancelled.append(job_id)
                self.inflight.remove(job_id)

    def _a_layer(self, job_id: int) -> str | None:
        response = self.api.get("GET /api/jobs/{id}/", f"/api/jobs/{job_id}/")
        if response is None or response.status_code != 200:
            return None
        return self.rng.choice(response.json()["params"]["layers"])

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            try:
                self.step()
            except Exception as exc:  # a body that is not the JSON we expect counts as unexpected
                self.unexpected.append(f"{type(exc).__name__}: {exc}")
            time.sleep(self.rng.uniform(0.02, 0.2))


def run(h: Harness) -> None:
    o = h.options
    recorder = Recorder()
    started = time.monotonic()
    clients = [LoadClient(h, i, recorder, started + o.load_seconds) for i in range(o.load_clients)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    elapsed = time.monotonic() - started
    samples = recorder.snapshot()
    table = latency_table(samples)
    h.latency_tables.append(
        (f"Load phase: {o.load_clients} clients for {o.load_seconds:.0f} s, latency per endpoint", table)
    )
    five = [s for s in samples if s.status >= 500]
    lost = [s for s in samples if s.status == 0]
    unexpected = [u for c in clients for u in c.unexpected]
    h.add(
        "load: no 5xx",
        f"{o.load_clients} concurrent clients for {o.load_seconds:.0f} s: submit, poll, cancel, list and read "
        "jobs, units, unit images, matrices, layers, concepts, paint",
        "0 answers 5xx, 0 requests without an answer",
        f"{len(samples)} requests ({len(samples) / elapsed:.0f}/s): {len(five)} 5xx, {len(lost)} without an answer"
        + (f"; e.g. {five[0].method} {five[0].path} {five[0].status}" if five else ""),
        not five and not lost,
    )
    h.add(
        "load: answers as expected",
        "every answer of the load phase checked against its endpoint",
        "2xx (409 for a cancel that lost the race to a finished job, 404 for the image of a unit without one)",
        f"{len(unexpected)} unexpected" + (f"; e.g. {unexpected[0]}" if unexpected else ""),
        not unexpected,
    )
    web = [r for r in table if r["endpoint"] != PAINT]
    paint = [r for r in table if r["endpoint"] == PAINT]
    worst = max(web, key=lambda r: r["p95"]) if web else None
    paint_p95 = paint[0]["p95"] if paint else float("nan")
    h.add(
        "load: p95 latency per endpoint",
        f"latency of every answered request, per endpoint ({len(table)} endpoints, table above)",
        f"p95 < {o.p95_limit:.1f} s on every endpoint the web process answers itself; < {o.paint_p95_limit:.1f} s "
        "for painting (a round trip to the painter worker, which shares the CPUs with the job workers)",
        (
            f"highest p95 {worst['p95'] * 1000:.0f} ms ({worst['endpoint']}), painting {paint_p95 * 1000:.0f} ms "
            f"(median of all {percentile([s.seconds for s in samples if s.status], 50) * 1000:.0f} ms)"
        )
        if worst
        else "none",
        worst is not None and worst["p95"] < o.p95_limit and (not paint or paint_p95 < o.paint_p95_limit),
    )
    retried = sum(c.retried for c in clients)
    mismatch = [m for c in clients for m in c.retry_mismatch]
    h.add(
        "load: idempotent retries",
        "a third of the load's job submissions sent again with the same Idempotency-Key",
        "every retry answers the job the first request created (no second job)",
        f"{retried} retries, {len(mismatch)} answered another job" + (f"; e.g. {mismatch[0]}" if mismatch else ""),
        retried > 0 and not mismatch,
    )
    accepted = [j for c in clients for j in c.accepted]
    cancelled = {j for c in clients for j in c.cancelled}
    drain_start = time.monotonic()
    by_owner: dict[str, list[int]] = {}
    for c in clients:
        by_owner.setdefault(c.user, []).extend(c.accepted)
    jobs = []
    for user, ids in by_owner.items():
        jobs += h.wait_final(h.client(user), ids, o.drain_seconds)
    drained = time.monotonic() - drain_start
    counts = {s: sum(1 for j in jobs if j["status"] == s) for s in ("succeeded", "failed", "cancelled")}
    not_final = [j["id"] for j in jobs if j["status"] not in FINAL]
    wrong = [j["id"] for j in jobs if j["status"] in FINAL and (j["status"] == "cancelled") != (j["id"] in cancelled)]
    failed = [f"{j['id']}: {j['error'][:80]}" for j in jobs if j["status"] == "failed"]
    h.add(
        "load: nothing lost",
        f"{len(accepted)} jobs accepted (202) during the load, {len(cancelled)} of them cancelled (200); "
        f"then waited for all to finish",
        "every accepted job final: cancelled exactly when its cancel was answered 200, else succeeded",
        f"{counts['succeeded']} succeeded, {counts['cancelled']} cancelled, {counts['failed']} failed, "
        f"{len(not_final)} not final, {len(wrong)} in the wrong state; drained {drained:.0f} s after the load"
        + (f"; failed: {failed[0]}" if failed else ""),
        accepted and not not_final and not wrong and not failed,
    )

"""Faults: a soak of jobs while workers, the API, Redis and Postgres are killed at random points;
then the media filesystem filled up.

Every fault is a real kill: ``kill -9`` of a worker's process group (chosen among those running
a job or shard at that moment) or of gunicorn's, ``kill -9`` of redis-server (restarted on its
append-only file), ``pg_ctl stop -m immediate`` of Postgres (a crash: recovery on start). A
supervisor's part is played here: the killed process is started again after a moment.
"""

from __future__ import annotations

import io
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.campaign.clients import Recorder, latency_table
from bench.campaign.harness import FINAL, Harness
from bench.campaign.load import LoadClient

KIND_NAMES = {
    "worker": "kill -9 a worker mid-job",
    "api": "kill -9 the API",
    "redis": "restart Redis (kill -9)",
    "postgres": "restart Postgres (crash)",
}


@dataclass
class Fault:
    kind: str
    at: float  # monotonic time of the kill
    victim: str = ""
    inflight: list[int] = field(default_factory=list)
    recovered: float | None = None  # seconds from the kill to a healthy answer
    note: str = ""


class SoakClient(LoadClient):
    """A load client that also submits sharded and generator jobs, and keeps going through faults."""

    def step(self) -> None:
        h, rng, fx = self.h, self.rng, self.h.fixtures
        if len(self.inflight) < 3 and rng.random() < 0.15:
            r = rng.random()
            if self.user == "alice" and r < 0.08:
                body = {
                    "type": "dissect",
                    "model": fx.generator["id"],
                    "params": {
                        "layers": ["layer2"],
                        "samples": 32,
                        "concepts": "colors",
                        "top_k_images": rng.choice((0, 3)),
                    },
                    "callback_url": h.hooks.url,
                }
            else:
                body = h.dissect_body(self.user, rng, sharded=r < 0.3)
            response = self.api.post("POST /api/jobs/", "/api/jobs/", json=body)
            if response is not None and response.status_code == 202:
                self.accepted.append(response.json()["id"])
                self.inflight.append(response.json()["id"])
            return
        super().step()


def _inflight(h: Harness) -> tuple[list[int], list[str]]:
    """Jobs queued or running now, and the workers running a job or shard."""
    try:
        jobs = [r[0] for r in h.sql("SELECT id FROM nd_job WHERE status IN ('queued', 'running') ORDER BY id")]
        busy = [
            r[0]
            for r in h.sql(
                "SELECT worker FROM nd_job WHERE status = 'running' AND stage = '' "
                "UNION SELECT s.worker FROM nd_job_shard s JOIN nd_job j ON j.id = s.job_id "
                "WHERE s.status = 'running' AND j.status = 'running'"
            )
        ]
    except Exception:
        return [], []
    return jobs, [b.split("@", 1)[0] for b in busy if b]


def _inject(h: Harness, kind: str) -> Fault:
    service, rng = h.service, h.random
    jobs, busy = _inflight(h)
    fault = Fault(kind, time.monotonic(), inflight=jobs)
    if kind == "worker":
        alive = service.alive_workers()
        candidates = [w for w in busy if w in alive] or alive
        fault.victim = rng.choice(candidates)
        fault.note = "running a job" if fault.victim in busy else "idle"
        service.kill_worker(fault.victim)
        time.sleep(rng.uniform(0.5, 3))
        fault.note += f", replaced by {service.start_worker()}"
    elif kind == "api":
        fault.victim = "gunicorn"
        service.kill_api()
        down = rng.uniform(0.5, 3)
        fault.note = f"restarted after {down:.1f} s"
        time.sleep(down)
        service.start_api()
    elif kind == "redis":
        fault.victim = "redis-server"
        h.redis.kill()
        down = rng.uniform(2, 6)
        fault.note = f"down {down:.1f} s"
        time.sleep(down)
        h.redis.start()
    elif kind == "postgres":
        fault.victim = "postgres"
        h.pg.stop("immediate")
        down = rng.uniform(2, 6)
        fault.note = f"down {down:.1f} s"
        time.sleep(down)
        h.pg.start()
    h._save_pids()
    try:
        service.wait_healthy(timeout=180, workers=1)
        fault.recovered = time.monotonic() - fault.at
    except RuntimeError as exc:
        fault.note += f"; not healthy: {exc}"
    return fault


def _schedule(h: Harness) -> list[tuple[float, str]]:
    o = h.options
    kinds = (
        ["worker"] * o.worker_kills
        + ["api"] * o.api_kills
        + ["redis"] * o.redis_restarts
        + ["postgres"] * o.postgres_restarts
    )
    h.random.shuffle(kinds)
    if not kinds:
        return []
    span = o.soak_seconds * 0.75
    gap = span / len(kinds)
    return [(o.soak_seconds * 0.1 + i * gap + h.random.uniform(0, gap * 0.5), kind) for i, kind in enumerate(kinds)]


def run_soak(h: Harness) -> None:
    o = h.options
    recorder = Recorder()
    started = time.monotonic()
    stop_at = started + o.soak_seconds
    clients = [SoakClient(h, 100 + i, recorder, stop_at) for i in range(6)]
    for client in clients:
        client.start()
    faults: list[Fault] = []
    for offset, kind in _schedule(h):
        time.sleep(max(0.0, started + offset - time.monotonic()))
        h.log(f"fault: {KIND_NAMES[kind]}")
        fault = _inject(h, kind)
        h.log(
            f"  {fault.victim} ({fault.note}), {len(fault.inflight)} jobs in flight, healthy again "
            f"after {fault.recovered and round(fault.recovered, 1)} s"
        )
        faults.append(fault)
    for client in clients:
        client.join()
    h.log(f"soak over after {time.monotonic() - started:.0f} s; waiting for every job to finish")
    open_jobs = h.db_wait_all_final(timeout=o.drain_seconds)
    status = {row[0]: row[1:] for row in h.sql("SELECT id, status, error, attempts FROM nd_job")}
    samples = recorder.snapshot()
    h.latency_tables.append((f"Soak with faults: 6 clients for {o.soak_seconds:.0f} s", latency_table(samples)))

    def outcome(ids: list[int]) -> tuple[str, bool]:
        got = [status.get(i, ("missing", "", 0)) for i in ids]
        counts = {s: sum(1 for g in got if g[0] == s) for s in ("succeeded", "failed", "cancelled")}
        not_final = sum(1 for g in got if g[0] not in FINAL)
        unexplained = sum(1 for g in got if g[0] == "failed" and not g[1].strip())
        retried = sum(1 for g in got if g[2] and g[2] > 1)
        text = (
            f"{len(ids)} jobs in flight: {counts['succeeded']} succeeded, {counts['failed']} failed, "
            f"{counts['cancelled']} cancelled, {not_final} not final, {retried} ran more than once"
        )
        return text, not_final == 0 and unexplained == 0

    for kind, name in KIND_NAMES.items():
        mine = [f for f in faults if f.kind == kind]
        if not mine:
            continue
        ids = sorted({i for f in mine for i in f.inflight})
        text, ok = outcome(ids)
        recovered = [f.recovered for f in mine]
        ok = ok and all(r is not None for r in recovered)
        h.add(
            f"{name} (x{len(mine)})",
            "; ".join(f"t={f.at - started:.0f} s {f.victim}" + (f" ({f.note})" if f.note else "") for f in mine),
            "healthy again; every job in flight at the fault ends succeeded, cancelled or failed with a reason",
            f"healthy after {', '.join('never' if r is None else f'{r:.1f} s' for r in recovered)}; {text}",
            ok,
        )
    windows = [(f.at, f.at + (f.recovered or o.soak_seconds) + 5.0) for f in faults]

    def hit(s) -> bool:  # the request was in flight at some moment of a fault window
        return any(s.at <= b and s.at + s.seconds >= a for a, b in windows)

    outside = [s for s in samples if s.status >= 500 and not hit(s)]
    inside = [s for s in samples if s.status >= 500 and hit(s)]
    silent = [s for s in samples if s.status == 0]
    h.add(
        "soak: no 5xx outside the faults",
        f"6 clients through the soak ({len(samples)} requests)",
        "no 5xx for a request that was not in flight during [fault, healthy again + 5 s]",
        f"{len(outside)} outside; within the fault windows {len(inside)} 5xx and {len(silent)} without an answer"
        + (
            f"; e.g. {outside[0].method} {outside[0].path} {outside[0].status} {outside[0].body[:80]}"
            if outside
            else ""
        ),
        not outside,
    )
    all_ids = sorted(status)
    accepted = {j for c in clients for j in c.accepted}
    _webhook_row(h, {i: status[i][0] for i in accepted if i in status}, o.drain_seconds)
    text, ok = outcome([i for i in all_ids if i in accepted])
    h.add(
        "soak: every accepted job final",
        f"{sum(len(c.accepted) for c in clients)} jobs accepted (202) during a {o.soak_seconds:.0f} s soak with "
        f"{len(faults)} faults",
        "each ends succeeded, cancelled, or failed with a reason; no job in the database left queued or running",
        text + f"; {len(open_jobs)} jobs of the database not final",
        ok and not open_jobs,
    )


def _webhook_row(h: Harness, final: dict[int, str], timeout: float) -> None:
    """Each accepted job's final state delivered to the receiver: one delivery id per job and
    final event (duplicates of one delivery are allowed: at least once, deduped by its id)."""
    wanted = {(job, state) for job, state in final.items() if state in FINAL}
    deadline = time.monotonic() + min(timeout, 120.0)
    while True:
        got = [(j, e, d) for j, e, d in h.hooks.snapshot() if e in FINAL]
        seen = {(j, e) for j, e, _ in got}
        if wanted <= seen or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    ids: dict[tuple[int, str], set[str]] = {}
    for job, event, delivery in got:
        ids.setdefault((job, event), set()).add(delivery)
    missing = wanted - seen
    extra = {key for key in seen if key[0] in final} - wanted  # an event that is not the job's final state
    several = [key for key, found in ids.items() if key in wanted and len(found) > 1]
    duplicates = sum(1 for job, _, _ in got if job in final) - len({(j, e, d) for j, e, d in got if j in final})
    why = ""
    if missing:  # what the service recorded about the deliveries that did not arrive
        rows = h.sql(
            "SELECT d.job_id, d.event, d.attempts, d.status_code, d.error, d.delivered, d.next_attempt IS NULL, "
            "j.status FROM nd_webhook_delivery d JOIN nd_job j ON j.id = d.job_id WHERE d.job_id = ANY(%s)",
            ([job for job, _ in missing],),
        )
        found = {row[0] for row in rows}
        why = f"; missing jobs {sorted(job for job, _ in missing)}: " + ", ".join(
            f"job {r[0]} {r[7]}: {r[1]} attempts {r[2]} code {r[3]} delivered {r[5]} done {r[6]} {r[4][:60]!r}"
            for r in rows
        )
        why += "".join(f", job {job} has no delivery row" for job, _ in missing if job not in found)
    h.add(
        "soak: webhooks once per final state",
        f"every soak job carried a callback_url to a receiver on loopback; {len(wanted)} jobs ended during "
        "a soak that killed workers and restarted Redis and Postgres",
        "each job's final state delivered, under one delivery id; repeats of a delivery counted "
        "(at least once: receivers dedupe on X-Netdissect-Delivery)",
        f"{len(wanted) - len(missing)} of {len(wanted)} delivered, {len(several)} with more than one delivery id, "
        f"{len(extra)} with another final event, {duplicates} repeated receipts{why}",
        not missing and not several and not extra,
    )


# ---------------------------------------------------------------------- disk full


def _png(size: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _uploads(h: Harness) -> tuple[dict, dict]:
    from safetensors.torch import save

    from dissect_core.archs import ARCHS

    net = ARCHS["scenecnn"](num_classes=6)
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(4):
            zf.writestr(f"images/{i}.png", _png())
    model = {
        "data": {"name": "full-disk", "arch": "builtin:scenecnn", "num_classes": "6", "input_size": "64"},
        "files": {"weights": ("w.safetensors", weights)},
    }
    dataset = {
        "data": {"name": "full-disk", "format": "imagefolder", "concepts": "colors"},
        "files": {"archive": ("d.zip", archive.getvalue())},
    }
    return model, dataset


def run_disk_full(h: Harness) -> None:
    if not h.media.mounted:
        h.add(
            "disk full",
            "put MEDIA_ROOT on a small tmpfs",
            "a filesystem that fills",
            f"could not mount a tmpfs: {h.media.why_not}",
            False,
        )
        return
    api = h.client("alice")
    model_upload, dataset_upload = _uploads(h)
    uploads = Path(h.media.path) / "uploads"
    before = {p for p in uploads.rglob("*") if p.is_file()}
    left_files: set[Path] = set()
    wrote = h.media.fill()
    left = h.media.free_bytes()
    h.log(f"media tmpfs filled: {wrote / 2**20:.0f} MB of ballast, {left} bytes free")
    try:
        ids = []
        for sharded, top in ((False, 3), (False, 0), (True, 3)):
            body = h.dissect_body("alice", sharded=sharded)
            body["params"]["top_k_images"] = top
            response = api.post("POST /api/jobs/", "/api/jobs/", json=body)
            if response is not None and response.status_code == 202:
                ids.append(response.json()["id"])
        jobs = h.wait_final(api, ids, timeout=300)
        answers = []
        for what, upload in (("models", model_upload), ("datasets", dataset_upload)):
            response = api.post(f"POST /api/{what}/", f"/api/{what}/", data=upload["data"], files=upload["files"])
            answers.append((what, response))
        left_files = {p for p in uploads.rglob("*") if p.is_file()} - before
    finally:
        h.media.unfill()
    ok_jobs = all(j["status"] in FINAL for j in jobs) and len(ids) == 3
    reasons = [
        j["error"].strip().splitlines()[0][:90] if j["error"].strip() else "" for j in jobs if j["status"] == "failed"
    ]
    unexplained = [j["id"] for j in jobs if j["status"] == "failed" and "space" not in j["error"].lower()]
    h.add(
        "disk full: jobs",
        f"filled the {h.options.media_mb} MB media tmpfs ({left} bytes left), then submitted 3 dissections "
        "(one sharded, two with unit images)",
        "each ends failed with the reason (no space left) or succeeded with whole results; none stuck "
        "(partial files: see 'no duplicate or partial results')",
        "; ".join(f"job {j['id']} {j['status']}" for j in jobs) + (f"; reason: {reasons[0]}" if reasons else ""),
        ok_jobs and not unexplained,
    )

    def shape(response) -> str:
        if response is None:
            return "no answer"
        try:
            body = response.json()
        except ValueError:
            return f"{response.status_code} not JSON: {response.text[:60]!r}"
        if response.status_code < 400:
            return f"{response.status_code} (id {body.get('id')})"
        return f"{response.status_code} {body.get('message', body)!s:.70}"

    good = not left_files and all(
        r is not None and r.status_code == 507 and set(r.json()) == {"message", "extra"} for _, r in answers
    )
    h.add(
        "disk full: uploads",
        "uploaded a weights file and a dataset archive to the full media filesystem",
        "507 with the error shape {message, extra} (no 500), nothing left under media/uploads",
        "; ".join(f"{what}: {shape(r)}" for what, r in answers) + f"; files left under uploads: {len(left_files)}",
        good,
    )
    retry = api.post("POST /api/jobs/", "/api/jobs/", json=h.dissect_body("alice"))
    job = (
        h.wait_final(api, [retry.json()["id"]], timeout=300)[0]
        if retry is not None and retry.status_code == 202
        else {"status": "not accepted", "error": shape(retry)}
    )
    again = api.post("POST /api/models/", "/api/models/", data=model_upload["data"], files=model_upload["files"])
    h.add(
        "disk full: recovery",
        "freed the space, then submitted a dissection and uploaded the weights again",
        "the job succeeds and the upload registers (201)",
        f"job {job['status']}{' ' + job['error'][:80] if job['status'] != 'succeeded' else ''}; upload {shape(again)}",
        job["status"] == "succeeded" and again is not None and again.status_code == 201,
    )

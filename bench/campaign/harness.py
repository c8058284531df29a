"""Brings up the private stack and the service, makes users, data and weights, and tears it all down."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.campaign.clients import Client, Recorder
from bench.campaign.stack import (
    ROOT,
    MediaFs,
    PrivatePostgres,
    PrivateRedis,
    Service,
    free_port,
)
from bench.campaign.table import Row

FINAL = ("succeeded", "failed", "cancelled")
USERS = {"alice": False, "bob": False, "carol": False, "admin": True}


def password(user: str) -> str:
    return f"campaign-{user}-pw"


@dataclass
class Options:
    quick: bool = False
    seed: int = 0
    workers: int = 2
    web_workers: int = 4
    load_seconds: float = 180
    load_clients: int = 12
    soak_seconds: float = 300
    worker_kills: int = 3
    api_kills: int = 2
    redis_restarts: int = 1
    postgres_restarts: int = 1
    schemathesis_examples: int = 20
    media_mb: int = 1536
    p95_limit: float = 1.0
    paint_p95_limit: float = 5.0
    stale_seconds: float = 15
    drain_seconds: float = 600
    keep: bool = False


@dataclass
class Fixtures:
    """What setup registered over the API, per user."""

    model: dict = field(default_factory=dict)  # user -> model row (scenecnn, random weights)
    datasets: dict = field(default_factory=dict)  # user -> [dataset rows]
    conv_layers: list[str] = field(default_factory=list)
    units: dict[str, int] = field(default_factory=dict)  # layer -> units of the scenecnn
    generator: dict | None = None
    generator_job: dict | None = None
    paint_concept: str | None = None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


class WebhookReceiver:
    """An HTTP receiver on loopback for the jobs' webhooks: records (job id, event, delivery id)
    of every POST and answers 200."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[tuple[int, str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with contextlib.suppress(ValueError, KeyError), receiver.lock:
                    receiver.received.append(
                        (
                            json.loads(body)["id"],
                            self.headers["X-Netdissect-Event"],
                            self.headers["X-Netdissect-Delivery"],
                        )
                    )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self) -> list[tuple[int, str, str]]:
        with self.lock:
            return list(self.received)


class Harness:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.random = random.Random(options.seed)
        self.top = ROOT / "var" / "campaign"
        self.logs = self.top / "logs"
        self.data = self.top / "data"
        self.outside = self.top / "outside"
        self.rows: list[Row] = []
        self.recorder = Recorder()
        self.tokens: dict[str, str] = {}
        self.fixtures = Fixtures()
        self.pg: PrivatePostgres | None = None
        self.redis: PrivateRedis | None = None
        self.media = MediaFs(self.top / "media", options.media_mb)
        self.service: Service | None = None
        self.started = time.monotonic()
        self.latency_tables: list[tuple[str, list[dict]]] = []
        self.hooks = WebhookReceiver()

    # ------------------------------------------------------------------ bring-up

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f} s] {message}", flush=True)

    def add(self, name: str, done: str, expected: str, observed: str, held: bool) -> Row:
        row = Row(name, done, expected, observed, bool(held))
        self.rows.append(row)
        self.log(f"{row.result}: {name}: {observed}")
        return row

    def _clean_previous(self) -> None:
        """Stop what an interrupted earlier run left (its own Postgres, Redis, tmpfs), then start afresh."""
        pids = self.top / "pids.json"
        if pids.exists():
            for pid, cmdline in json.loads(pids.read_text()):
                if _cmdline(pid) == cmdline:  # still that very process, not a reused pid
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
        old_pg = PrivatePostgres(self.top / "pg", 0)
        old_pg.stop("immediate")
        self.media.umount()
        shutil.rmtree(self.top, ignore_errors=True)

    def _save_pids(self) -> None:
        procs = []
        if self.redis and self.redis.proc:
            procs.append(self.redis.proc)
        if self.service:
            procs += [p for p in (self.service.api, self.service.painter, *self.service.workers.values()) if p]
        (self.top / "pids.json").write_text(json.dumps([[p.pid, _cmdline(p.pid)] for p in procs]))

    def up(self) -> None:
        self._clean_previous()
        for folder in (self.top, self.logs, self.data, self.outside, self.top / "var"):
            folder.mkdir(parents=True, exist_ok=True)
        self.pg = PrivatePostgres(self.top / "pg", free_port())
        self.pg.init()
        self.pg.start()
        self.pg.create_database()
        self.redis = PrivateRedis(self.top / "redis", free_port())
        self.redis.start()
        if not self.media.mount():
            self.log(f"no tmpfs for the media ({self.media.why_not}); MEDIA_ROOT is a plain folder")
        self.log(
            f"private Postgres on {self.pg.port}, Redis on {self.redis.port} (append-only file), "
            f"media {'on a ' + str(self.options.media_mb) + ' MB tmpfs' if self.media.mounted else 'folder'}"
        )
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATABASE_URL": self.pg.url,
            "CELERY_BROKER_URL": self.redis.url,
            "REDIS_URL": self.redis.url,
            "VAR_DIR": str(self.top / "var"),
            "MEDIA_ROOT": str(self.media.path),
            "DATA_ROOTS": str(self.data),
            "SECRET_KEY": f"campaign-{self.options.seed}-not-a-secret",
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "JOB_STALE_SECONDS": str(self.options.stale_seconds),
            "JOB_HEARTBEAT_SECONDS": "2",
            "WORKER_HEARTBEAT_SECONDS": "3",
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "INFO",
            # The load phases measure the service, not its per-user limits (tests/service/test_limits.py).
            "API_WRITE_RATE": "",
            "API_MAX_QUEUED_JOBS": "100000",
            # Every job of the load and the soak reports to self.hooks, on loopback.
            "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "WEBHOOK_RETRY_SECONDS": "1",
        }
        self.service = Service(env=env, logs=self.logs, api_port=free_port(), web_workers=self.options.web_workers)
        self.service.manage("migrate", "--noinput")
        self._make_users()
        self._make_data()
        self.service.start_api()
        for _ in range(self.options.workers):
            self.service.start_worker()
        self.service.start_painter()
        self._save_pids()
        took = self.service.wait_healthy(timeout=240, workers=self.options.workers + 1)
        self.log(
            f"service healthy after {took:.1f} s: API {self.service.base}, {self.options.workers} workers and a painter"
        )
        self._register()

    def _make_users(self) -> None:
        script = (
            "import json\n"
            "from django.contrib.auth import get_user_model\n"
            "from rest_framework.authtoken.models import Token\n"
            "User = get_user_model()\n"
            "out = {}\n"
            f"for name, staff in {list(USERS.items())!r}:\n"
            "    user = User.objects.create_user(username=name, password=f'campaign-{name}-pw',"
            " is_staff=staff, is_superuser=staff)\n"
            "    out[name] = Token.objects.get_or_create(user=user)[0].key\n"
            "print(json.dumps(out))\n"
        )
        out = self.service.manage("shell", "-c", script)
        self.tokens = json.loads(out.strip().splitlines()[-1])

    def _make_data(self) -> None:
        import torch
        from safetensors.torch import save_file

        from dissect_core.archs import ARCHS
        from dissect_core.gan import build_generator
        from dissect_core.synthetic import generate

        for n, seed in ((24, 11), (40, 12), (60, 13)):
            generate(self.data / f"scenes-{n}", n_images=n, seed=seed)
        torch.manual_seed(self.options.seed)
        net = ARCHS["scenecnn"](num_classes=6)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(self.data / "scenecnn.safetensors"))
        gen = build_generator("dcgan", latent_dim=16)
        save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, str(self.data / "dcgan.safetensors"))

    def client(self, user: str | None, recorder: Recorder | None = None, timeout: float = 60) -> Client:
        return Client(
            self.service.base,
            self.tokens.get(user) if user else None,
            recorder if recorder is not None else None,
            timeout=timeout,
        )

    def _register(self) -> None:
        fx = self.fixtures
        for user in ("alice", "bob"):
            api = self.client(user)
            response = api.post(
                "models.create",
                "/api/models/",
                json={
                    "name": f"scenecnn-{user}",
                    "arch": "builtin:scenecnn",
                    "num_classes": 6,
                    "input_size": 64,
                    "weights_path": str(self.data / "scenecnn.safetensors"),
                },
            )
            if response is None or response.status_code != 201:
                raise RuntimeError(f"registering {user}'s model failed: {response and response.text[:500]}")
            fx.model[user] = response.json()
            fx.datasets[user] = []
            for n in (24, 40, 60):
                response = api.post(
                    "datasets.create",
                    "/api/datasets/",
                    json={"name": f"scenes-{n}", "format": "synthetic", "path": str(self.data / f"scenes-{n}")},
                )
                if response is None or response.status_code != 201:
                    raise RuntimeError(f"registering a dataset failed: {response and response.text[:500]}")
                fx.datasets[user].append(response.json())
        layers = fx.model["alice"]["layers"]
        fx.conv_layers = [entry["name"] for entry in layers if entry.get("type") == "Conv2d"]
        fx.units = {entry["name"]: entry["units"] for entry in layers}
        api = self.client("alice")
        response = api.post(
            "models.create",
            "/api/models/",
            json={
                "name": "dcgan",
                "arch": "builtin:dcgan",
                "kind": "generator",
                "weights_path": str(self.data / "dcgan.safetensors"),
            },
        )
        if response is None or response.status_code != 201:
            raise RuntimeError(f"registering the generator failed: {response and response.text[:500]}")
        fx.generator = response.json()
        response = api.post(
            "jobs.create",
            "/api/jobs/",
            json={
                "type": "dissect",
                "model": fx.generator["id"],
                "params": {"layers": ["layer3"], "samples": 48, "concepts": "colors", "top_k_images": 0},
            },
        )
        job = self.wait_final(api, [response.json()["id"]], timeout=300)[0]
        if job["status"] != "succeeded":
            raise RuntimeError(f"the generator dissection failed: {job['error']}")
        fx.generator_job = job
        rows = api.get("units.list", f"/api/units/?job={job['id']}&page_size=20").json()["results"]
        fx.paint_concept = next((row["label"] for row in rows if row.get("label")), None)
        self.log(
            f"registered: scenecnn ({len(fx.conv_layers)} conv layers) and 3 datasets per user, "
            f"a dcgan generator (dissected, paint concept {fx.paint_concept!r})"
        )

    # ------------------------------------------------------------------ helpers for phases

    def dissect_body(self, user: str, rng: random.Random | None = None, *, sharded: bool = False) -> dict:
        fx = self.fixtures
        rng = rng or self.random
        dataset = rng.choice(fx.datasets[user])
        layers = sorted(rng.sample(fx.conv_layers, rng.choice((1, 2))))
        params: dict = {"layers": layers, "top_k_images": rng.choice((0, 3))}
        if sharded:
            params["shard_size"] = max(8, dataset["image_count"] // 3)
        return {
            "type": "dissect",
            "model": fx.model[user]["id"],
            "dataset": dataset["id"],
            "params": params,
            "callback_url": self.hooks.url,
        }

    def wait_final(self, api: Client, ids: list[int], timeout: float) -> list[dict]:
        """Poll until every job is final; returns the jobs (those not final at the deadline as last seen)."""
        deadline = time.monotonic() + timeout
        last: dict[int, dict] = {}
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                response = api.get("jobs.retrieve", f"/api/jobs/{job_id}/")
                if response is not None and response.status_code == 200:
                    last[job_id] = response.json()
                    if last[job_id]["status"] in FINAL:
                        pending.remove(job_id)
            if pending:
                time.sleep(1.0)
        return [last.get(i, {"id": i, "status": "unknown", "error": "never read"}) for i in ids]

    def db_wait_all_final(self, timeout: float) -> list[tuple]:
        """Wait until no job in the database is queued or running; returns those still open."""
        deadline = time.monotonic() + timeout
        open_jobs: list[tuple] = []
        while time.monotonic() < deadline:
            try:
                conn = self.pg.connect()
                with conn.cursor() as cursor:
                    cursor.execute(
                        "SELECT id, status, phase, attempts FROM nd_job "
                        "WHERE status NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY id"
                    )
                    open_jobs = cursor.fetchall()
                conn.close()
            except Exception:
                open_jobs = [("database unreachable",)]
            if not open_jobs:
                return []
            time.sleep(2.0)
        return open_jobs

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        conn = self.pg.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(query, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    # ------------------------------------------------------------------ tear-down

    def down(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.stop("fast")
        self.media.umount()
        (self.top / "pids.json").unlink(missing_ok=True)

"""``manage.py serve`` (what ``make serve`` runs) supervises its processes: a worker killed with
SIGKILL mid-job is started again while the rest keep serving, its job is recovered and succeeds,
and two SIGTERMs in a row stop every process it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import _flush_broker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]

ROOT = Path(__file__).resolve().parents[2]
BROKER = "redis://127.0.0.1:6379/12"  # not the test workers' database: only serve's workers run its jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), fields[0], cmdline)
    return out


def _tree(root: int) -> set[int]:
    """root and all its descendants."""
    procs = _processes()
    found, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, _) in procs.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def _alive(pids: set[int]) -> set[int]:
    procs = _processes()
    return {pid for pid in pids if pid in procs and procs[pid][1] != "Z"}


def _wait(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; serve's output ends:\n{log.read_text()[-3000:]}")


def test_serve_restarts_a_killed_worker_and_two_sigterms_stop_everything(api, user, worker_pool, resnet, tmp_path):
    from django.conf import settings
    from django.db import connection
    from rest_framework.authtoken.models import Token

    from api.models import Job, WorkerHeartbeat

    worker_pool.shrink(0)  # the suite's workers would recover the job on their own broker
    _flush_broker(BROKER)
    db = connection.settings_dict
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "CELERY_BROKER_URL": BROKER,
        "VAR_DIR": str(settings.VAR_DIR),
        "DATA_ROOTS": os.pathsep.join(str(p) for p in settings.DATA_ROOTS),
        "WEB_CONCURRENCY": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")
    serve = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    started: set[int] = set()
    try:
        _wait(lambda: "serving:" in log_path.read_text(), 240, "the service to be up", log_path)
        started = _tree(serve.pid)
        base = f"http://127.0.0.1:{port}/api"
        headers = {"Authorization": f"Token {Token.objects.get_or_create(user=user)[0].key}"}
        model, dataset = resnet
        response = requests.post(
            f"{base}/jobs/",
            json={
                "type": "dissect",
                "model": model["id"],
                "dataset": dataset["id"],
                "params": {"layers": ["layer4"], "top_k_images": 0},
            },
            headers=headers,
            timeout=30,
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        job = _wait(
            lambda: Job.objects.filter(pk=job_id, status="running", progress__gt=0).first(),
            180,
            "the job to be running",
            log_path,
        )
        name = job.worker.split("@", 1)[0]
        procs = _processes()
        victim = next(
            pid for pid, (ppid, _, cmd) in procs.items() if ppid == serve.pid and f"--hostname {name}@%h" in cmd
        )
        os.killpg(victim, signal.SIGKILL)  # the worker and its pool process, mid-job

        def final():
            body = requests.get(f"{base}/jobs/{job_id}/", headers=headers, timeout=30).json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        body = _wait(final, 400, "the job to finish", log_path)
        assert body["status"] == "succeeded", body["error"]
        assert body["attempts"] >= 2
        text = log_path.read_text()
        assert f"{name} was killed by SIGKILL" in text and f"{name} started again" in text
        hostname = job.worker
        _wait(
            lambda: WorkerHeartbeat.objects.filter(hostname=hostname).exclude(pid=victim).exists(),
            120,
            f"{hostname} to be back",
            log_path,
        )
        health = requests.get(f"{base}/health/", timeout=30)
        assert health.status_code == 200 and health.json()["workers"]["alive"] >= 3  # 2 workers and the painter
        assert serve.poll() is None
        started |= _tree(serve.pid)
    finally:
        if serve.poll() is None:
            started |= _tree(serve.pid)
        for _ in range(2):  # the second arrives while the first is still stopping the children
            if serve.poll() is None:
                os.killpg(serve.pid, signal.SIGTERM)
                time.sleep(0.3)
        code = serve.wait(timeout=90)
        deadline = time.monotonic() + 30
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.3)
        left = _alive(started)
        for pid in left:  # leave nothing behind for the next test
            os.kill(pid, signal.SIGKILL)
    assert code == 0, log_path.read_text()[-3000:]
    assert not left, {pid: _processes().get(pid) for pid in left}

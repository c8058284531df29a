"""Shared fixtures. Service tests run against the real Postgres and Redis and a real worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def data_root() -> Path:
    from django.conf import settings

    root = settings.DATA_ROOTS[0]
    root.mkdir(parents=True, exist_ok=True)
    return root


def _flush_broker(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


class WorkerPool:
    """Real ``celery worker`` processes on the test database and the test Redis database."""

    def __init__(self, env: dict[str, str], blocker) -> None:
        self.env = env
        self.blocker = blocker
        self.procs: dict[str, subprocess.Popen] = {}
        self.count = 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def start(self) -> str:
        self.count += 1
        name = f"testworker{self.count}-{os.getpid()}"
        log = open(ARTIFACTS / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "celery"),
                "-A",
                "config",
                "worker",
                "--concurrency",
                "1",
                "--pool",
                "prefork",
                "--loglevel",
                "INFO",
                "--hostname",
                f"{name}@%h",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        from api.models import WorkerHeartbeat

        deadline = time.monotonic() + 90
        with self.blocker.unblock():
            while not WorkerHeartbeat.objects.filter(pid=proc.pid).exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    tail = (ARTIFACTS / f"{name}.log").read_text(errors="replace")[-3000:]
                    pytest.fail(f"the celery worker did not start; its log ends:\n{tail}")
                time.sleep(0.3)
        self.procs[name] = proc
        return name

    def alive(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def ensure(self, n: int) -> None:
        while len(self.alive()) < n:
            self.start()

    def kill(self, hostname: str) -> None:
        """kill -9 a worker (its main process and its pool children)."""
        name = hostname.split("@", 1)[0]
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def shrink(self, n: int) -> None:
        """Stop workers (gracefully) until at most n are alive."""
        for name in self.alive()[n:]:
            proc = self.procs[name]
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def worker_pool(django_db_setup, django_db_blocker):
    from django.conf import settings
    from django.db import connection

    _flush_broker(settings.CELERY_BROKER_URL)
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "PYTHONUNBUFFERED": "1",
    }
    pool = WorkerPool(env, django_db_blocker)
    yield pool
    pool.stop_all()


@pytest.fixture()
def celery_worker_process(worker_pool):
    """At least one live worker process for this test."""
    worker_pool.ensure(1)
    return worker_pool


@pytest.fixture()
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw-alice")


@pytest.fixture()
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="pw-bob")


@pytest.fixture()
def api(user):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture()
def other_api(other_user):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    token, _ = Token.objects.get_or_create(user=other_user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def wait_final(api, job_id: int, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/api/jobs/{job_id}/").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job}")


@pytest.fixture()
def scenes(data_root):
    from dissect_core.synthetic import generate

    path = data_root / "scenes-24"
    if not (path / "index.csv").exists():
        generate(path, n_images=24, seed=3)
    return path


@pytest.fixture()
def demo_weights(data_root, scenes):
    import torch
    from safetensors.torch import save_file

    from dissect_core.archs import ARCHS
    from dissect_core.datasets import open_dataset

    classes = open_dataset(f"broden:{scenes}").classes
    torch.manual_seed(0)
    net = ARCHS["scenecnn"](num_classes=len(classes))
    path = data_root / "scenecnn-random.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, len(classes)


def register(api, scenes, demo_weights, *, public=False):
    weights, num_classes = demo_weights
    model = api.post(
        "/api/models/",
        {
            "name": "scenecnn",
            "arch": "builtin:scenecnn",
            "num_classes": num_classes,
            "input_size": 64,
            "weights_path": str(weights),
            "public": public,
        },
        format="json",
    )
    assert model.status_code == 201, model.json()
    dataset = api.post("/api/datasets/", {"name": "scenes", "format": "synthetic", "path": str(scenes)}, format="json")
    assert dataset.status_code == 201, dataset.json()
    return model.json(), dataset.json()


@pytest.fixture()
def big_scenes(data_root):
    from dissect_core.synthetic import generate

    path = data_root / "scenes-160"
    if not (path / "index.csv").exists():
        generate(path, n_images=160, seed=5)
    return path


@pytest.fixture()
def resnet(api, data_root, big_scenes):
    """A resnet18 (random weights) at 224 px: slow enough on a CPU to interrupt mid-pass."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    path = data_root / "resnet18-6.safetensors"
    if not path.exists():
        torch.manual_seed(1)
        net = torchvision.models.resnet18(num_classes=6)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model = api.post(
        "/api/models/",
        {"name": "r18", "arch": "torchvision:resnet18", "num_classes": 6, "weights_path": str(path)},
        format="json",
    )
    assert model.status_code == 201, model.json()
    dataset = api.post(
        "/api/datasets/", {"name": "s160", "format": "synthetic", "path": str(big_scenes)}, format="json"
    )
    assert dataset.status_code == 201, dataset.json()
    return model.json(), dataset.json()


@pytest.fixture()
def model_rows(user):
    """A classifier with one layer and a dataset with classes, as rows (nothing to load): enough
    for the API to accept a dissect job."""
    from api.models import Dataset, NetworkModel

    layers = [{"name": "conv5", "type": "Conv2d", "units": 8, "height": 4, "width": 4}]
    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x", layers=layers)
    dataset = Dataset.objects.create(owner=user, name="d", format="broden", path="/y", classes=["a", "b"])
    return model, dataset

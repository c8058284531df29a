"""Speed-up of one sharded dissection job on 1 vs 2 worker processes (real Postgres and Redis).

    .venv/bin/python bench/bench_workers.py [--images 480] [--shard-size 60]

Creates its own database (netdissect_bench_workers) and uses Redis database 14.
Prints a table: workers, wall time of the job (submit to succeeded), speed-up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "netdissect_bench_workers"
BROKER = "redis://127.0.0.1:6379/14"
VAR = ROOT / "var" / "bench-workers"

os.environ.update(
    {
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB_NAME}",
        "CELERY_BROKER_URL": BROKER,
        "VAR_DIR": str(VAR),
        "DATA_ROOTS": str(VAR / "data"),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "JOB_HEARTBEAT_SECONDS": "1",
    }
)
sys.path.insert(0, str(ROOT))


def reset_database() -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        cursor.execute(f"CREATE DATABASE {DB_NAME}")
    conn.close()
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, check=True, capture_output=True)


def start_workers(n: int) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        log = open(VAR / f"worker{i}.log", "ab")
        procs.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "celery"),
                    "-A",
                    "config",
                    "worker",
                    "--concurrency",
                    "1",
                    "--loglevel",
                    "WARNING",
                    "--hostname",
                    f"bench{i}@%h",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    from api.models import WorkerHeartbeat

    deadline = time.monotonic() + 120
    while WorkerHeartbeat.objects.filter(pid__in=[p.pid for p in procs]).count() < n:
        if time.monotonic() > deadline:
            raise SystemExit("workers did not start (see var/bench-workers/worker*.log)")
        time.sleep(0.5)
    return procs


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--shard-size", type=int, default=60)
    parser.add_argument("--layer", default="layer4")
    args = parser.parse_args()

    VAR.mkdir(parents=True, exist_ok=True)
    reset_database()
    import django

    django.setup()
    import redis
    import torch
    import torchvision
    from django.contrib.auth import get_user_model
    from safetensors.torch import save_file

    from api import services
    from api.models import Job, WorkerHeartbeat
    from dissect_core.synthetic import generate

    data = VAR / "data"
    scenes = data / f"scenes-{args.images}"
    if not (scenes / "index.csv").exists():
        generate(scenes, n_images=args.images, seed=11)
    weights = data / "resnet18-6.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=6)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    user = get_user_model().objects.create_user("bench")
    model = services.model_register(
        owner=user, name="r18", arch="torchvision:resnet18", num_classes=6, weights_path=str(weights)
    )
    dataset = services.dataset_register(owner=user, name="scenes", format="synthetic", path=str(scenes))

    rows = []
    for n in (1, 2):
        redis.Redis.from_url(BROKER).flushdb()
        WorkerHeartbeat.objects.all().delete()
        procs = start_workers(n)
        try:
            started = time.monotonic()
            job = services.job_create(
                owner=user,
                type="dissect",
                model=model,
                dataset=dataset,
                params={"layers": [args.layer], "shard_size": args.shard_size, "top_k_images": 0},
            )
            while True:
                job.refresh_from_db()
                if job.is_final:
                    break
                time.sleep(0.5)
            wall = time.monotonic() - started
            if job.status != Job.Status.SUCCEEDED:
                raise SystemExit(f"job ended {job.status}: {job.error}")
            rows.append((n, wall))
        finally:
            stop_workers(procs)

    print(
        f"job: dissect {args.layer} of resnet18 (224 px) on {args.images} synthetic images, "
        f"shards of {args.shard_size}; {os.cpu_count()} CPU cores, torch {torch.__version__}"
    )
    print(f"{'workers':>8}  {'wall s':>8}  {'images/s':>9}  {'speed-up':>8}")
    for n, wall in rows:
        print(f"{n:>8}  {wall:>8.1f}  {args.images / wall:>9.1f}  {rows[0][1] / wall:>7.2f}x")


if __name__ == "__main__":
    main()

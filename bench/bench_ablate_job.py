"""The whole ablate job through the service, against one bare forward pass (issue #20's fixture case).

    .venv/bin/python bench/bench_ablate_job.py [--images 300] [--arch shufflenet_v2_x1_0] [--layer stage4] [--jobs 2]

A real Celery worker process, Postgres and Redis (the database and broker of
``bench/bench_workers.py``, recreated). It registers the torchvision network with random
weights (6 classes, 112 px input), a synthetic scene dataset at 112 px (about 4/5 train,
1/5 val), submits ``--jobs`` ``ablate`` jobs on the layer one after the other and times each: submit
to succeeded (what a caller waits), and the job's own started-to-finished span. The first
job is a fresh worker process's first. The reference is one bare forward
pass of the same network over the images of both splits, in this process (best of 3).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_workers import BROKER, VAR, reset_database, start_workers, stop_workers

TARGET = 20.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--arch", default="shufflenet_v2_x1_0")
    parser.add_argument("--layer", default="stage4")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--jobs", type=int, default=2, help="jobs run one after the other on the same worker")
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
    from dissect_core.broden import BrodenDataset
    from dissect_core.dissect import preprocess_images
    from dissect_core.models import load_model
    from dissect_core.synthetic import generate

    data = VAR / "data"
    scenes = data / f"scenes{args.size}-{args.images}"
    if not (scenes / "index.csv").exists():
        generate(scenes, n_images=args.images, seed=3, image_size=(args.size, args.size))
    weights = data / f"{args.arch}-6.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        net = getattr(torchvision.models, args.arch)(num_classes=6)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))

    model = load_model(f"torchvision:{args.arch}", weights, 6, input_size=args.size)
    splits = [BrodenDataset(scenes, split=s) for s in ("train", "val")]
    images = torch.stack([torch.from_numpy(ds[i].image).permute(2, 0, 1) for ds in splits for i in range(len(ds))])
    forward = float("inf")
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            for s in range(0, len(images), 64):
                model.module(preprocess_images(images[s : s + 64], model.input_size, model.mean, model.std))
            forward = min(forward, time.perf_counter() - t0)

    user = get_user_model().objects.create_user("bench")
    row = services.model_register(
        owner=user,
        name=args.arch,
        arch=f"torchvision:{args.arch}",
        num_classes=6,
        weights_path=str(weights),
        input_size=args.size,
    )
    dataset = services.dataset_register(owner=user, name="scenes", format="broden", path=str(scenes))
    redis.Redis.from_url(BROKER).flushdb()
    WorkerHeartbeat.objects.all().delete()
    procs = start_workers(1)
    results = []  # (job s, submit-succeeded s) per job
    try:
        for _ in range(args.jobs):
            submitted = time.monotonic()
            job = services.job_create(
                owner=user, type="ablate", model=row, dataset=dataset, params={"layer": args.layer}
            )
            while True:
                job.refresh_from_db()
                if job.is_final:
                    break
                time.sleep(0.2)
            wall = time.monotonic() - submitted
            if job.status != Job.Status.SUCCEEDED:
                raise SystemExit(f"job ended {job.status}: {job.error}")
            results.append(((job.finished - job.started).total_seconds(), wall))
    finally:
        stop_workers(procs)
    print(
        f"ablate job: {args.arch} at {args.size} px, {args.layer}, {len(splits[0])} train / {len(splits[1])} val "
        f"synthetic scenes, one worker process; {os.cpu_count()} CPU cores, torch {torch.__version__}"
    )
    print(
        f"{'job':>4}{'forward s':>10}{'job s (started-finished)':>26}{'ratio':>8}{'submit-succeeded s':>20}{'ratio':>8}"
    )
    for i, (span, wall) in enumerate(results, 1):
        print(f"{i:>4}{forward:>10.2f}{span:>26.2f}{span / forward:>7.1f}x{wall:>20.2f}{wall / forward:>7.1f}x")
    print(f"target {TARGET:.0f}x; job 1 is a fresh worker's first job")


if __name__ == "__main__":
    main()

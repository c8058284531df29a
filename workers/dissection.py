"""The body of a dissection job: dissect_core does the work, api.services stores it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from django.conf import settings

from api import services
from api.models import Job


def pick_device() -> str:
    import torch

    wanted = settings.WORKER_DEVICE
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


class ProgressReporter:
    """Throttled progress writes (a heartbeat) and the cancel check dissect_core polls."""

    PHASE_SHARE = {"forward": (0.0, 0.6), "quantile": (0.6, 0.75), "refine": (0.75, 0.8), "count": (0.8, 0.97)}

    def __init__(self, job_id: int, interval: float) -> None:
        self.job_id = job_id
        self.interval = interval
        self.last = 0.0
        self.status = Job.Status.RUNNING

    def progress(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and done < total:
            return
        self.last = now
        start, end = self.PHASE_SHARE.get(phase, (0.0, 0.97))
        fraction = start + (end - start) * (done / total if total else 1.0)
        self.status = services.job_progress(
            job_id=self.job_id, phase=phase, done=done, total=total, fraction=fraction
        )

    def should_stop(self) -> bool:
        return self.status == Job.Status.CANCELLED


def run_dissection(job: Job) -> None:
    import torch

    from dissect_core.datasets import open_dataset
    from dissect_core.dissect import dissect
    from dissect_core.models import load_model

    params = job.params
    model_row = job.model
    loaded = load_model(
        model_row.arch,
        Path(model_row.weights_path),
        model_row.num_classes,
        input_size=model_row.input_size,
        mean=model_row.mean or None,
        std=model_row.std or None,
    )
    dataset_row = job.dataset
    dataset = open_dataset(
        dataset_row.spec,
        max_images=params.get("max_images"),
        colors=dataset_row.concepts_source == "colors",
    )
    reporter = ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS)
    reporter.progress("loading", 0, len(dataset))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = dissect(
        loaded,
        dataset,
        params["layers"],
        quantile=params.get("quantile", 0.99),
        batch_size=params.get("batch_size", settings.DISSECT_BATCH_SIZE),
        device=pick_device(),
        progress=reporter.progress,
        should_stop=reporter.should_stop,
        top_k_images=params.get("top_k_images", 5),
    )
    reporter.progress("storing", len(dataset), len(dataset))
    concepts = [(c.name, c.category) for c in dataset.concepts]
    for layer, result in results.items():
        top = getattr(result, "top_images", None)
        services.layer_result_store(
            job=job,
            layer=layer,
            thresholds=np.asarray(result.thresholds, dtype=np.float64),
            iou=np.asarray(result.iou, dtype=np.float64),
            concepts=concepts,
            summary=result.summary(min_iou=0.04),
            top_images=[[int(i) for i in row] for row in np.asarray(top)] if top is not None else None,
        )
    services.job_succeed(job_id=job.pk, results_path=str(Path(settings.MEDIA_ROOT) / "results" / f"job-{job.pk}"))

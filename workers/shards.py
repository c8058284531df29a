"""Sharded dissection: a job's images split into ranges that run on whichever workers are free.

Stages, each a fan-out over the same image ranges, each shard writing one state file:

- ``quantile``: per-layer quantile sketches (they merge by adding histograms);
- ``refine1``, ``refine2``, ...: only while some thresholds are not exact yet, the
  values inside each unit's bracket (they merge by concatenation);
- ``count``: per unit x concept counts at the exact thresholds (integers: they add).

The worker that finishes the last shard of a stage merges the stage and opens the
next one; after ``count`` it finalizes and stores the results. Shard state lives in
files under ``MEDIA_ROOT/work/job-N`` and in ``JobShard`` rows, never in Celery results.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from django.conf import settings

from api import services
from api.job_params import DissectBase, GeneratorDissectParams, params_of
from api.models import Job, JobShard
from workers.reporting import ShardReporter


def work_dir(job_id: int) -> Path:
    return Path(settings.MEDIA_ROOT) / "work" / f"job-{job_id}"


def shard_ranges(n_images: int, shard_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard_size, n_images)) for a in range(0, n_images, shard_size)]


def save_states(path: Path, states: dict[str, dict[str, np.ndarray]]) -> None:
    """Write {layer: state_dict} atomically as one .npz."""
    flat = {f"{layer}|{key}": np.asarray(value) for layer, state in states.items() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_states(path: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for name in data.files:
            layer, key = name.split("|", 1)
            out.setdefault(layer, {})[key] = data[name]
    return out


class JobInputs:
    """The loaded model and dataset of a job (loaded once per task)."""

    def __init__(self, job: Job) -> None:
        from dissect_core.datasets import open_dataset
        from workers.generators import generated_dataset, load_network

        self.params = params = params_of(job, DissectBase)
        self.model = load_network(job.model)
        if isinstance(params, GeneratorDissectParams):  # seeded samples labelled by the concept source
            self.dataset = generated_dataset(self.model, params)
        else:
            self.dataset = open_dataset(
                job.dataset.spec,
                max_images=params.max_images,
                colors=job.dataset.concepts_source == "colors",
            )
        self.layers = params.layers
        self.quantile = params.quantile
        self.batch_size = params.batch_size


def start(job: Job, n_images: int, shard_size: int) -> None:
    """Open the first stage of a sharded job."""
    shutil.rmtree(work_dir(job.pk), ignore_errors=True)
    services.shards_create(job=job, stage="quantile", ranges=shard_ranges(n_images, shard_size))


def run_shard(job: Job, shard: JobShard) -> bool:
    """Compute one shard's state file. Returns True when it was the stage's last shard."""
    from dissect_core.dissect import count_pass, quantile_pass, refine_pass
    from dissect_core.quantile import QuantileBracket
    from workers.dissection import pick_device, with_batch_backoff

    inputs = JobInputs(job)
    indices = list(range(shard.start, shard.stop))
    folder = work_dir(job.pk)
    path = folder / f"{shard.stage}-{shard.index}.npz"
    with ShardReporter(shard.pk, shard.start, settings.JOB_HEARTBEAT_SECONDS) as reporter:
        common = {
            "indices": indices,
            "device": pick_device(),
            "progress": reporter.progress,
            "should_stop": reporter.should_stop,
        }
        if shard.stage == "quantile":

            def run(batch_size: int) -> dict:
                return quantile_pass(inputs.model, inputs.dataset, inputs.layers, batch_size=batch_size, **common)
        elif shard.stage.startswith("refine"):
            brackets = {
                k: QuantileBracket.from_state_dict(v)
                for k, v in load_states(folder / f"{shard.stage}-brackets.npz").items()
            }

            def run(batch_size: int) -> dict:
                return refine_pass(
                    inputs.model, inputs.dataset, list(brackets), brackets, batch_size=batch_size, **common
                )
        else:
            thresholds = {k: v["t"] for k, v in load_states(folder / "thresholds.npz").items()}

            def run(batch_size: int) -> dict:
                return count_pass(
                    inputs.model,
                    inputs.dataset,
                    inputs.layers,
                    thresholds,
                    batch_size=batch_size,
                    top_k_images=inputs.params.top_k_images,
                    evidence_blocks=inputs.params.evidence_blocks,
                    **common,
                )

        out = with_batch_backoff(run, inputs.batch_size)
        save_states(path, {layer: state.state_dict() for layer, state in out.items()})
    return services.shard_done(shard_id=shard.pk, path=str(path))


def _merge_stage(job: Job, stage: str, cls) -> dict:
    merged: dict = {}
    for shard in JobShard.objects.filter(job=job, stage=stage).order_by("index"):
        for layer, state in load_states(Path(shard.path)).items():
            part = cls.from_state_dict(state)
            merged[layer] = part if layer not in merged else merged[layer].merge(part)
    return merged


def advance(job: Job, reporter) -> None:
    """Merge the finished stage of a job and open the next one (or finish the job)."""
    from dissect_core.counts import ConceptCounts
    from dissect_core.quantile import QuantileRefiner, QuantileSketch

    folder = work_dir(job.pk)
    stage = job.stage
    ranges = list(JobShard.objects.filter(job=job, stage=stage).order_by("index").values_list("start", "stop"))
    if stage == "quantile" or stage.startswith("refine"):
        if stage == "quantile":
            sketches = _merge_stage(job, stage, QuantileSketch)
            quantile = params_of(job, DissectBase).quantile
            brackets = {layer: s.bracket(quantile) for layer, s in sketches.items()}
            resolved: dict = {}
            round_no = 0
        else:
            round_no = int(stage[len("refine") :])
            refined = _merge_stage(job, stage, QuantileRefiner)
            brackets = {layer: r.bracket() for layer, r in refined.items()}
            resolved = (
                {k: v["t"] for k, v in load_states(folder / "resolved.npz").items()}
                if (folder / "resolved.npz").exists()
                else {}
            )
        for layer, bracket in brackets.items():
            if bracket.done:
                resolved[layer] = bracket.values()
        save_states(folder / "resolved.npz", {layer: {"t": t} for layer, t in resolved.items()})
        pending = {layer: b for layer, b in brackets.items() if not b.done}
        if pending:
            next_stage = f"refine{round_no + 1}"
            save_states(folder / f"{next_stage}-brackets.npz", {layer: b.state_dict() for layer, b in pending.items()})
            services.shards_create(job=job, stage=next_stage, ranges=ranges)
        else:
            save_states(folder / "thresholds.npz", {layer: {"t": t} for layer, t in resolved.items()})
            services.shards_create(job=job, stage="count", ranges=ranges)
        return
    if stage == "count":
        from dissect_core.dissect import finalize
        from workers.dissection import store_results

        inputs = JobInputs(job)
        thresholds = {k: v["t"] for k, v in load_states(folder / "thresholds.npz").items()}
        counts = _merge_stage(job, stage, ConceptCounts)
        results = {
            layer: finalize(
                layer,
                thresholds[layer],
                counts[layer],
                inputs.dataset.concepts,
                quantile=inputs.quantile,
                resamples=inputs.params.resamples,
                seed=inputs.params.evidence_seed,
            )
            for layer in inputs.layers
        }
        services.job_stage_set(job=job, stage="finish")
        store_results(job, inputs.model, inputs.dataset, results, reporter)
        shutil.rmtree(folder, ignore_errors=True)

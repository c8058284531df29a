"""Generator jobs: dissection of generated images, unit removal and insertion, and painting.

Loading lives here so that dissection, shards and the painting task build networks and
concept sources the same way. A worker process keeps the last few loaded generators
(and their insertion values) so that painting answers quickly.
"""

from __future__ import annotations

import functools
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

from api import services
from api.job_params import GeneratorDissectParams, GeneratorInsertParams, GeneratorRemoveParams, params_of
from api.models import Job, NetworkModel
from workers.dissection import pick_device, with_batch_backoff
from workers.reporting import ProgressReporter


def load_network(row: NetworkModel):
    """The dissect_core LoadedModel of a registered model row (any kind), with the layer layouts its
    registration recorded."""
    from dissect_core.layouts import LayerLayout
    from dissect_core.models import load_model

    if row.kind == NetworkModel.Kind.GENERATOR:
        from dissect_core.generators import load_generator

        loaded = load_generator(
            row.arch,
            Path(row.weights_path),
            latent_dim=row.latent_dim,
            output_range=tuple(row.output_range or (-1.0, 1.0)),
        )
    else:
        loaded = load_model(
            row.arch,
            Path(row.weights_path),
            row.num_classes,
            input_size=row.input_size,
            mean=row.mean or None,
            std=row.std or None,
            classes=row.classes or None,
        )
    for entry in row.layers or []:
        if "kind" in entry:
            loaded.layouts[entry["name"]] = LayerLayout.from_row(entry)
    return loaded


def concept_source(value: str | int):
    """The colour-name segmenter, or a dissect_core Segmenter built from a registered segmenter model."""
    if value == "colors":
        from dissect_core.generators import ColorSegmenter

        return ColorSegmenter()
    from dissect_core.segmenter import Segmenter

    row = NetworkModel.objects.get(pk=int(value), kind=NetworkModel.Kind.SEGMENTER)
    loaded = load_network(row)
    categories = list(row.categories) if row.categories else "object"
    return Segmenter(
        loaded.module,
        row.classes,
        categories=categories,
        mean=loaded.mean,
        std=loaded.std,
        input_size=tuple(loaded.input_size),
    )


def generated_dataset(model, params: GeneratorDissectParams):
    """The seeded generated images of a generator dissection, labelled by its concept source."""
    from dissect_core.generators import GeneratedDataset

    return GeneratedDataset(
        model,
        concept_source(params.concepts),
        params.samples,
        seed=params.seed,
        batch_size=params.batch_size,
        device=pick_device(),
    )


def concept_number(source, name: str) -> int:
    """The number of a concept, by name, in a concept source."""
    for concept in source.concepts:
        if concept.name == name:
            return concept.number
    raise _error(f"the concept source has no concept {name!r}")


def _error(message: str):
    from dissect_core.errors import DissectError

    return DissectError(message)


def ranked_units(job_id: int, layer: str, concept: str) -> tuple[list[int], list[float]]:
    """A dissection's units of ``layer`` by IoU with ``concept``, best first, with those IoUs."""
    from api.selectors import job_matrix_path

    dissection = Job.objects.get(pk=job_id)
    with np.load(job_matrix_path(job=dissection, layer=layer), allow_pickle=False) as data:
        names = [str(n) for n in data["concept_names"]]
        iou = np.asarray(data["iou"], dtype=np.float64)
    columns = [i for i, n in enumerate(names) if n == concept]
    if not columns:
        raise _error(f"dissection job {job_id} has no concept {concept!r}")
    score = iou[:, columns].max(axis=1)
    order = np.argsort(-score, kind="stable")
    return [int(u) for u in order], [float(score[u]) for u in order]


def _grid_png(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """Save uint8 images [N, H, W, 3] as one PNG grid (2 px gaps)."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def _hwc(images) -> np.ndarray:
    """uint8 images as [N, H, W, 3] numpy (from [N, 3, H, W] tensors or arrays)."""
    array = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
    if array.ndim == 4 and array.shape[1] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(array.astype(np.uint8))


def results_dir(job: Job) -> Path:
    return Path(settings.MEDIA_ROOT) / "results" / f"job-{job.pk}"


def _edit_inputs(job: Job, params: GeneratorRemoveParams | GeneratorInsertParams):
    """(generator, concept source, concept number, ranked units, their IoUs) of a remove/insert job."""
    model = load_network(job.model)
    source = concept_source(params.concepts)
    number = concept_number(source, params.concept)
    units, ious = ranked_units(params.dissection, params.layer, params.concept)
    return model, source, number, units, ious


def run_generator_remove(job: Job) -> None:
    """Zero the top-k units of a concept for each k; store the pixel-share curve and sample images."""
    from dissect_core.generators import removal_curve

    params = params_of(job, GeneratorRemoveParams)
    with ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS) as reporter:
        reporter.progress("loading", 0, params.samples)
        model, source, number, units, ious = _edit_inputs(job, params)
        result = with_batch_backoff(
            lambda batch_size: removal_curve(
                model,
                source,
                params.layer,
                units,
                number,
                ks=params.ks,
                count=params.samples,
                seed=params.seed,
                batch_size=batch_size,
                sample_images=params.sample_images,
                device=pick_device(),
                progress=reporter.progress,
                should_stop=reporter.should_stop,
            ),
            params.batch_size,
        )
        reporter.progress("storing", 1, 1)
        top = max(params.ks)
        summary = {
            "concept": params.concept,
            "layer": params.layer,
            "dissection": params.dissection,
            "units": units[:top],
            "unit_iou": ious[:top],
            "samples": result.count,
            "seed": result.seed,
            "baseline": result.baseline,
            "curve": [
                {"k": k, "share": share, "change": change}
                for k, share, change in zip(result.ks, result.fractions, result.relative_change)
            ],
        }
        _store(job, summary, "removal", result.before_images, result.after_images)


def run_generator_insert(job: Job) -> None:
    """Set the top-k units of a concept high at every position; store the map of added pixels."""
    from dissect_core.generators import insertion_map, unit_quantiles

    params = params_of(job, GeneratorInsertParams)
    with ProgressReporter(job.pk, settings.JOB_HEARTBEAT_SECONDS) as reporter:
        reporter.progress("loading", 0, params.samples)
        model, source, number, units, ious = _edit_inputs(job, params)
        chosen = units[: params.k]
        values = unit_quantiles(
            model, params.layer, q=params.quantile, seed=params.seed + 7919, units=chosen, device=pick_device()
        )
        result = with_batch_backoff(
            lambda batch_size: insertion_map(
                model,
                source,
                params.layer,
                chosen,
                number,
                values=values,
                count=params.samples,
                seed=params.seed,
                stride=params.stride,
                size=params.size,
                batch_size=batch_size,
                sample_images=8,
                device=pick_device(),
                progress=reporter.progress,
                should_stop=reporter.should_stop,
            ),
            params.batch_size,
        )
        reporter.progress("storing", 1, 1)
        summary = {
            "concept": params.concept,
            "layer": params.layer,
            "dissection": params.dissection,
            "units": chosen,
            "unit_iou": ious[: params.k],
            "values": [float(v) for v in np.asarray(values)],
            "samples": result.count,
            "seed": result.seed,
            **insertion_grid(result, params.stride, params.size),
        }
        _store(job, summary, "insert", result.before_images, result.after_images)


def insertion_grid(result, stride: int, size: int) -> dict[str, Any]:
    """The tested positions of an insertion map as a dense grid, with its mean and best cell."""
    full = np.asarray(result.map, dtype=np.float64)
    tested = np.asarray(result.tested, dtype=bool)
    rows = [int(y) for y in np.flatnonzero(tested.any(axis=1))]
    cols = [int(x) for x in np.flatnonzero(tested.any(axis=0))]
    grid = [[None if np.isnan(full[y, x]) else round(float(full[y, x]), 6) for x in cols] for y in rows]
    best = result.best_position
    return {
        "map": grid,
        "positions": {
            "stride": stride,
            "size": size,
            "height": int(full.shape[0]),
            "width": int(full.shape[1]),
            "rows": rows,
            "cols": cols,
        },
        "mean_added": float(result.mean_fraction),
        "best": {"y": best[0], "x": best[1], "added": float(full[best])} if best is not None else None,
    }


def _store(job: Job, summary: dict, prefix: str, before, after) -> None:
    """Write the before/after sample grids, the summary, and mark the job succeeded."""
    out = results_dir(job)
    images = {}
    if before is not None and len(before):
        _grid_png(_hwc(before), out / f"{prefix}-before.png")
        _grid_png(_hwc(after), out / f"{prefix}-after.png")
        images = {"before": f"{prefix}-before", "after": f"{prefix}-after"}
    summary["images"] = images
    services.job_summary_store(job=job, summary=summary)
    services.job_succeed(job_id=job.pk, results_path=str(out))


# Painting -------------------------------------------------------------------------------

_PAINT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _painter(model_id: int, weights_path: str, layer: str, concept: str, dissection: int, k: int, quantile: float):
    """(loaded generator, the concept's top-k units, their insertion values), cached per process."""
    from dissect_core.generators import unit_quantiles

    row = NetworkModel.objects.get(pk=model_id)
    model = load_network(row)
    units, _ = ranked_units(dissection, layer, concept)
    chosen = units[:k]
    values = unit_quantiles(model, layer, q=quantile, seed=7919, units=chosen, device="cpu")
    return model, chosen, values


def paint_png(
    *,
    model_id: int,
    layer: str,
    concept: str,
    dissection: int,
    k: int,
    quantile: float,
    seed: int,
    index: int,
    mode: str,
    mask: list[list[int]],
) -> dict[str, Any]:
    """Edit one generated image: add or erase a concept inside a mask. PNGs as bytes."""
    import time

    from PIL import Image

    from dissect_core.generators import paint

    started = time.perf_counter()
    row = NetworkModel.objects.only("weights_path").get(pk=model_id)
    with _PAINT_LOCK:
        model, units, values = _painter(model_id, row.weights_path, layer, concept, dissection, k, quantile)
        before, after = paint(
            model,
            layer,
            units,
            seed=seed,
            index=index,
            mask=np.asarray(mask, dtype=bool),
            mode=mode,
            values=values,
            return_before=True,
            device="cpu",
        )
    encoded = {}
    for name, image in (("before", before), ("after", after)):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
        encoded[name] = buffer.getvalue()
    return {"units": units, "milliseconds": round(1000 * (time.perf_counter() - started), 1), **encoded}

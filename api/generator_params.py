"""Checks of generator job parameters (dissect, generator_remove, generator_insert).

Generator jobs have no dataset: a dissection samples ``samples`` latents from ``seed``,
generates the images and labels them with ``concepts`` ("colors" or a segmenter model
id). Removal and insertion rank the layer's units by their IoU with ``concept`` in a
succeeded dissection of the same layer (``dissection``, default: the latest one) and
label their images with the same concept source.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from django.db.models import Q

from api.errors import ApplicationError
from api.models import Job, NetworkModel

DEFAULT_REMOVE_KS = [1, 2, 4, 8, 12, 16, 20]
MAX_SAMPLES = 100_000


def _check_known(params: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApplicationError(f"unknown params: {', '.join(unknown)}", extra={"allowed": sorted(known)})


def _int(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApplicationError(f"params.{key} must be an integer in {low}..{high}")
    return value


def concept_source_check(*, owner, value: Any) -> str | int:
    """``"colors"`` or the id of a segmenter model the owner can see."""
    if value == "colors":
        return "colors"
    if isinstance(value, int) and not isinstance(value, bool):
        found = NetworkModel.objects.filter(
            Q(owner=owner) | Q(public=True), pk=value, kind=NetworkModel.Kind.SEGMENTER
        ).exists()
        if found:
            return value
    raise ApplicationError(
        'params.concepts must be "colors" or the id of a segmenter model you can see '
        "(register one with kind=segmenter)"
    )


def _dissect(owner, model: NetworkModel, params: dict[str, Any]) -> dict[str, Any]:
    from api.services import _validate_dissect_params

    own = {"samples", "seed", "concepts"}
    rest = {k: v for k, v in params.items() if k not in own}
    if "max_images" in rest:
        raise ApplicationError("generator dissections take params.samples (how many images to generate), not max_images")
    if not rest.get("layers"):
        raise ApplicationError("params.layers is required for a generator (e.g. [\"layer3\"])",
                               extra={"valid": [entry["name"] for entry in model.layers]})
    out = _validate_dissect_params(model, rest)
    out["samples"] = _int(params, "samples", 1000, 1, MAX_SAMPLES)
    out["seed"] = _int(params, "seed", 0, 0, 2**31 - 1)
    out["concepts"] = concept_source_check(owner=owner, value=params.get("concepts", "colors"))
    return out


def _layer(model: NetworkModel, params: dict[str, Any]) -> dict:
    layers = {entry["name"]: entry for entry in model.layers}
    layer = params.get("layer")
    if not isinstance(layer, str) or layer not in layers:
        raise ApplicationError(f"params.layer must be one layer of model {model.name}, not {layer!r}",
                               extra={"valid": list(layers)})
    return layers[layer]


def _dissection(owner, model: NetworkModel, layer: str, value: Any) -> Job:
    jobs = Job.objects.filter(
        Q(owner=owner) | Q(model__public=True), model=model, type=Job.Type.DISSECT, status=Job.Status.SUCCEEDED,
        layer_results__layer=layer,
    )
    if value is None:
        job = jobs.order_by("-finished", "-id").first()
        if job is None:
            raise ApplicationError(
                f"no succeeded dissection of layer {layer} of model {model.name}: run a dissect job on it first "
                "(removal and insertion rank units by their IoU with the concept)"
            )
        return job
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApplicationError("params.dissection must be a job id")
    job = jobs.filter(pk=value).first()
    if job is None:
        raise ApplicationError(f"job {value} is not a succeeded dissection of layer {layer} of model {model.name}")
    return job


def _concept(job: Job, layer: str, value: Any) -> str:
    from api.selectors import job_matrix_path

    if not isinstance(value, str) or not value:
        raise ApplicationError("params.concept must be a concept name")
    with np.load(job_matrix_path(job=job, layer=layer), allow_pickle=False) as data:
        names = [str(n) for n in data["concept_names"]]
    if value not in names:
        raise ApplicationError(f"dissection job {job.pk} knows no concept {value!r}",
                               extra={"concepts": sorted(set(names))})
    return value


def _edit_common(owner, model: NetworkModel, params: dict[str, Any]) -> dict[str, Any]:
    info = _layer(model, params)
    job = _dissection(owner, model, info["name"], params.get("dissection"))
    return {
        "layer": info["name"],
        "concept": _concept(job, info["name"], params.get("concept")),
        "dissection": job.pk,
        "concepts": job.params.get("concepts", "colors"),
        "seed": _int(params, "seed", 1, 0, 2**31 - 1),
        "batch_size": _int(params, "batch_size", 32, 1, 1024),
    }


def _remove(owner, model: NetworkModel, params: dict[str, Any]) -> dict[str, Any]:
    # "concepts" comes from the dissection; accepted (and replaced) so that a job's own params re-run it.
    _check_known(params, {"layer", "concept", "dissection", "ks", "samples", "seed", "batch_size", "sample_images",
                          "concepts"})
    out = _edit_common(owner, model, params)
    units = next(e["units"] for e in model.layers if e["name"] == out["layer"])
    ks = params.get("ks", [k for k in DEFAULT_REMOVE_KS if k <= units])
    if not isinstance(ks, list) or not ks or not all(
        isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= units for k in ks
    ):
        raise ApplicationError(f"params.ks must be a list of unit counts in 1..{units}")
    out["ks"] = sorted(set(ks))
    out["samples"] = _int(params, "samples", 200, 1, MAX_SAMPLES)
    out["sample_images"] = _int(params, "sample_images", 8, 0, 64)
    return out


def _insert(owner, model: NetworkModel, params: dict[str, Any]) -> dict[str, Any]:
    _check_known(params, {"layer", "concept", "dissection", "k", "quantile", "samples", "seed", "batch_size",
                          "stride", "size", "concepts"})
    out = _edit_common(owner, model, params)
    info = _layer(model, params)
    out["k"] = _int(params, "k", min(20, info["units"]), 1, info["units"])
    quantile = params.get("quantile", 0.995)
    if not isinstance(quantile, (int, float)) or isinstance(quantile, bool) or not 0.0 < quantile < 1.0:
        raise ApplicationError("params.quantile must be a number strictly between 0 and 1 (insertion value)")
    out["quantile"] = float(quantile)
    out["samples"] = _int(params, "samples", 32, 1, 10_000)
    out["stride"] = _int(params, "stride", 1, 1, max(info["height"], info["width"]))
    out["size"] = _int(params, "size", 1, 1, max(info["height"], info["width"]))
    return out


def validate_generator_params(*, owner, type: str, model: NetworkModel, params: dict[str, Any]) -> dict[str, Any]:
    """The cleaned params of a generator job, or an ApplicationError that names the problem."""
    if type == Job.Type.GENERATOR_REMOVE:
        return _remove(owner, model, params)
    if type == Job.Type.GENERATOR_INSERT:
        return _insert(owner, model, params)
    return _dissect(owner, model, params)

"""Checks of job parameters that need the model, the dataset, the owner or other jobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Q

from api.errors import ApplicationError
from api.models import Dataset, Job, NetworkModel


@dataclass(frozen=True)
class JobContext:
    """What a job's checks may look at beyond its params."""

    owner: Any
    model: NetworkModel
    dataset: Dataset | None


def layer_names(model: NetworkModel) -> list[str]:
    return [entry["name"] for entry in model.layers]


def layer_problem(model: NetworkModel, name: Any) -> None:
    """Raise when ``name`` is a layer of the model that cannot be laid out as unit maps (it says why)."""
    problem = (model.layer_problems or {}).get(name) if isinstance(name, str) else None
    if problem:
        raise ApplicationError(problem, extra={"layer": name, "valid": layer_names(model)})


def layer_entry(model: NetworkModel, name: Any, *, verb: str = "be one layer") -> dict:
    """The model's layer entry (name, type, units, height, width, kind) for ``params.layer``."""
    for entry in model.layers:
        if entry["name"] == name:
            return entry
    layer_problem(model, name)
    raise ApplicationError(
        f"params.layer must {verb} of model {model.name}, not {name!r}", extra={"valid": layer_names(model)}
    )


def concept_source_check(*, owner, value: Any) -> str | int:
    """``"colors"`` or the id of a segmenter model the owner can see."""
    if value == "colors":
        return "colors"
    if isinstance(value, int) and not isinstance(value, bool):
        visible = Q(owner=owner) | Q(public=True)
        if NetworkModel.objects.filter(visible, pk=value, kind=NetworkModel.Kind.SEGMENTER).exists():
            return value
    raise ApplicationError(
        'params.concepts must be "colors" or the id of a segmenter model you can see (register one with kind=segmenter)'
    )


def dissection_job(*, owner, model: NetworkModel, layer: str, value: int | None) -> Job:
    """The succeeded dissection of ``layer`` that ranks units for removal, insertion and painting."""
    jobs = Job.objects.filter(
        Q(owner=owner) | Q(model__public=True),
        model=model,
        type=Job.Type.DISSECT,
        status=Job.Status.SUCCEEDED,
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
    job = jobs.filter(pk=value).first()
    if job is None:
        raise ApplicationError(f"job {value} is not a succeeded dissection of layer {layer} of model {model.name}")
    return job


def dissection_concept(*, job: Job, layer: str, value: str) -> str:
    """``value`` when the dissection's IoU matrix of ``layer`` has that concept."""
    import numpy as np

    from api.selectors import job_matrix_path

    with np.load(job_matrix_path(job=job, layer=layer), allow_pickle=False) as data:
        names = [str(n) for n in data["concept_names"]]
    if value not in names:
        raise ApplicationError(
            f"dissection job {job.pk} knows no concept {value!r}", extra={"concepts": sorted(set(names))}
        )
    return value


def in_range(value: int, low: int, high: int, message: str) -> int:
    if not low <= value <= high:
        raise ApplicationError(message)
    return value

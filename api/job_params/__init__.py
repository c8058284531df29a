"""Job parameters: one typed definition per job type, and everything made from it.

Each job type's parameters are one frozen dataclass below. Its fields carry their type, default,
range and help text (:func:`param`). From that one definition come:

- the API's checks (:func:`job_params_clean`, called by the job service): unknown keys are
  refused, types and ranges are checked by a DRF serializer built from the dataclass, then the
  class's ``resolve`` does what needs the model, the dataset or the owner (layer names, defaults
  that depend on the layer, the jobs a job builds on);
- the OpenAPI schema (:func:`params_serializer`, :data:`PARAMS`): one component per job type
  and model kind, with types, defaults, ranges and descriptions;
- the dashboard's job form (``api.dashboard.forms`` builds its fields from :func:`form_params`);
- the worker's typed values (:func:`params_of`): a job's stored params as the dataclass, any
  missing value filled from the same defaults.

A job stores the values that decide its results (defaults included, so a re-run repeats it
even when a default changes later); tuning knobs that do not change results (``top_k_images``,
``shard_size``) are stored only when given, and the worker applies its own defaults. Adding a
parameter is one field in ``api/job_params/definitions.py``, its use in the worker, and a test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from api.errors import ApplicationError
from api.job_params.checks import JobContext, concept_source_check, dissection_concept, dissection_job
from api.job_params.definitions import (
    PARAMS,
    AblateParams,
    AttackParams,
    DissectBase,
    DissectParams,
    GeneratorDissectParams,
    GeneratorInsertParams,
    GeneratorRemoveParams,
    JobParams,
    ParamMeta,
    UnitClassifierParams,
    param_fields,
    params_class,
)
from api.job_params.schema import params_serializer
from api.models import Dataset, Job, NetworkModel

__all__ = [
    "PARAMS",
    "AblateParams",
    "AttackParams",
    "DissectBase",
    "DissectParams",
    "GeneratorDissectParams",
    "GeneratorInsertParams",
    "GeneratorRemoveParams",
    "JobParams",
    "UnitClassifierParams",
    "concept_source_check",
    "dissection_concept",
    "dissection_job",
    "form_params",
    "job_params_clean",
    "params_class",
    "params_of",
    "params_serializer",
]


def _first_error(errors: Any) -> str:
    if isinstance(errors, dict):
        return _first_error(next(iter(errors.values())))
    if isinstance(errors, list):
        return _first_error(errors[0])
    return str(errors)


def job_params_clean(
    *, type: str, owner, model: NetworkModel, dataset: Dataset | None, params: dict[str, Any]
) -> dict[str, Any]:
    """A job's params, checked and completed; raises ApplicationError naming the first problem.

    Returns:
        every parameter the worker will use (JSON), defaults and values derived from the model,
        dataset or other jobs included; a tuning knob (``stored=False``) only when given.
    """
    cls = params_class(type=type, kind=model.kind)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key in cls.refused:
            raise ApplicationError(cls.refused[key])
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ApplicationError(f"unknown params: {', '.join(unknown)}", extra={"allowed": sorted(names)})
    checked = params_serializer(cls)(data=params)
    if not checked.is_valid():
        raise ApplicationError(_first_error(checked.errors), extra={"fields": checked.errors})
    given = {k: v for k, v in checked.validated_data.items() if k in params}
    clean = cls(**given).resolve(JobContext(owner=owner, model=model, dataset=dataset)).to_json()
    for f, meta, _ in param_fields(cls):
        if not meta.stored and f.name not in params:
            clean.pop(f.name, None)
    return clean


P = TypeVar("P", bound=JobParams)


def params_of(job: Job, expected: type[P] = JobParams) -> P:
    """A job's stored params as its typed definition (for the worker); missing values take the defaults.

    Args:
        expected: the definition (or a base of it) the caller works with; another raises TypeError.
    """
    cls = params_class(type=job.type, kind=job.model.kind)
    if not issubclass(cls, expected):
        raise TypeError(f"job {job.pk} is a {job.type} job ({cls.__name__}), not {expected.__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in job.params.items() if k in names})


def form_params() -> list[tuple[type[JobParams], list[tuple[dataclasses.Field, ParamMeta, Any]]]]:
    """Every definition with its parameters that the dashboard form shows."""
    return [(cls, [row for row in param_fields(cls) if row[1].form]) for cls in PARAMS]

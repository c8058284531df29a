"""Painting (the paper's Figure 6): one generated image edited on a worker of the interactive queue."""

from __future__ import annotations

import base64
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from django.conf import settings

from api.errors import ApplicationError
from api.job_params import dissection_concept, dissection_job
from api.models import NetworkModel
from api.services import queue


def generator_paint(
    *,
    user,
    model: NetworkModel,
    layer: str,
    concept: str,
    seed: int,
    index: int,
    mode: str,
    mask: list[list[int]],
    k: int = 20,
    quantile: float = 0.995,
    dissection: int | None = None,
) -> dict[str, Any]:
    """Add or erase a concept inside a mask of one generated image, on a worker (queue "interactive").

    Units: the ``k`` units of ``layer`` with the highest IoU for ``concept`` in a succeeded
    dissection (default: the latest). Returns {"before", "after" (PNG bytes), "units",
    "milliseconds" (worker time), "dissection"}.
    """
    if model.kind != NetworkModel.Kind.GENERATOR:
        raise ApplicationError(f"model {model.name} is a {model.kind}; painting needs a generator")
    layers = {entry["name"]: entry for entry in model.layers}
    if layer not in layers:
        raise ApplicationError(f"unknown layer {layer!r} for model {model.name}", extra={"valid": list(layers)})
    if not 1 <= k <= layers[layer]["units"]:
        raise ApplicationError(f"k must be in 1..{layers[layer]['units']} (units of {layer})")
    job = dissection_job(owner=user, model=model, layer=layer, value=dissection)
    dissection_concept(job=job, layer=layer, value=concept)
    result = queue.paint_send(
        model_id=model.pk,
        layer=layer,
        concept=concept,
        dissection=job.pk,
        k=k,
        quantile=quantile,
        seed=seed,
        index=index,
        mode=mode,
        mask=mask,
    )
    try:
        out = result.get(timeout=settings.PAINT_TIMEOUT_SECONDS, propagate=True, disable_sync_subtasks=False)
    except CeleryTimeout:
        result.revoke()
        raise ApplicationError(
            f"no worker answered within {settings.PAINT_TIMEOUT_SECONDS:.0f} s (painting runs on a worker that "
            "consumes the 'interactive' queue; make serve starts one)",
            status=503,
        ) from None
    finally:
        result.forget()
    if "error" in out:
        raise ApplicationError(out["error"])
    return {
        "before": base64.b64decode(out["before"]),
        "after": base64.b64decode(out["after"]),
        "units": out["units"],
        "milliseconds": out["milliseconds"],
        "dissection": job.pk,
    }

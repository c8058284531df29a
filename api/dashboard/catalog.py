"""Models, datasets and the API token: lists, a model's page with its charts, registration forms."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render

from api import selectors, services
from api.dashboard.charts import _bar_chart, _category_bars, _layers_chart
from api.dashboard.common import (
    _add_service_error,
    _percent,
    _stability_options,
    _stability_param,
    category_colour,
)
from api.dashboard.forms import DatasetForm, ModelForm
from api.dashboard.generators import describe_sources
from api.errors import ApplicationError
from api.models import NetworkModel


@login_required
def models_page(request):
    rows = list(selectors.model_list(user=request.user).defer("mean", "std"))
    for model in rows:
        model.is_generator = model.kind == NetworkModel.Kind.GENERATOR
        model.layer_count = len(model.layers or [])
        model.unit_count = sum(entry.get("units") or 0 for entry in model.layers or [] if entry.get("type") == "Conv2d")
    return render(request, "dashboard/models.html", {"models": rows})


@login_required
def model_page(request, pk: int):
    user = request.user
    model = get_object_or_404(selectors.model_list(user=user), pk=pk)
    latest = selectors.dashboard_latest_layer_results(model=model, user=user)
    order = [entry["name"] for entry in model.layers or []]
    dissected = sorted(latest.values(), key=lambda r: order.index(r.layer) if r.layer in order else len(order))
    min_stability, notice = _stability_param(request)
    counts = selectors.dashboard_detector_counts(layer_results=dissected, min_stability=min_stability)
    sections = []
    for result in dissected:
        rows = counts[(result.job_id, result.layer)]
        sections.append(
            {
                "result": result,
                "has_evidence": "evidence" in (result.summary or {}),
                "detectors": sum(n for _, _, n in rows),
                "unique": len(rows),
                "chart": _bar_chart(rows),
                "categories": _category_bars(rows, unique=False),
                "legend": [{"name": c["name"], "colour": c["colour"]} for c in _category_bars(rows, unique=True)],
            }
        )
    layers = []
    for entry in model.layers or []:
        result = latest.get(entry["name"])
        layers.append({**entry, "result": result, "description": _layout_text(entry)})
    jobs = list(selectors.dashboard_model_jobs(model=model, user=user)[:20])
    describe_sources(user=user, jobs=jobs)
    labels = []
    if model.kind == NetworkModel.Kind.SEGMENTER:
        categories = model.categories or []
        labels = [
            {
                "index": i,
                "name": name,
                "category": categories[i] if i < len(categories) else "",
                "colour": category_colour(categories[i]) if i < len(categories) else "#9ca3af",
            }
            for i, name in enumerate(model.classes or [])
        ]
    return render(
        request,
        "dashboard/model.html",
        {
            "model": model,
            "is_generator": model.kind == NetworkModel.Kind.GENERATOR,
            "labels": labels,
            "layers": layers,
            "layer_problems": sorted((model.layer_problems or {}).items()),
            "sections": sections,
            "network_chart": _layers_chart([(r.layer, counts[(r.job_id, r.layer)]) for r in dissected])
            if dissected
            else None,
            "jobs": jobs,
            "min_iou": selectors.DETECTOR_MIN_IOU,
            "min_stability": "" if min_stability is None else f"{min_stability:g}",
            "stability_text": "" if min_stability is None else _percent(min_stability),
            "stabilities": _stability_options(min_stability),
            "notice": notice,
            "is_owner": model.owner_id == user.pk,
        },
    )


def _register_page(request, form_class, register, *, title: str, intro: str):
    """A registration form: on a valid POST, ``register(cleaned_data)`` returns (message, redirect) or
    raises the service's ApplicationError, which the form shows."""
    form = form_class(request.POST, request.FILES) if request.method == "POST" else form_class()
    if request.method == "POST" and form.is_valid():
        try:
            message, target = register(form.cleaned_data)
        except ApplicationError as exc:
            _add_service_error(form, exc)
        else:
            messages.success(request, message)
            return target
    return render(
        request,
        "dashboard/form.html",
        {
            "form": form,
            "title": f"Register a {title}",
            "submit": f"Register {title}",
            "multipart": True,
            "intro": intro,
        },
    )


def _layout_text(entry: dict) -> str:
    """How a layer is laid out as unit maps, in words (rows listed before layouts were recorded: maps)."""
    if entry.get("description"):
        return entry["description"]
    return f"feature map {entry.get('height')} × {entry.get('width')}"


@login_required
def model_new(request):
    def register(data: dict):
        model = services.model_register(
            owner=request.user,
            name=data["name"],
            arch=data["arch"],
            kind=data["kind"],
            num_classes=data["num_classes"],
            input_size=data["input_size"],
            weights_file=data["weights"] or None,
            weights_path=(data["weights_path"] or "").strip() or None,
            public=data["public"],
        )
        message = f"Model {model.name} registered with {len(model.layers)} layers."
        return message, redirect("dashboard-model", pk=model.pk)

    return _register_page(
        request,
        ModelForm,
        register,
        title="model",
        intro="The weights are loaded into the architecture in a separate process before the model is saved; "
        "files are never unpickled with code.",
    )


@login_required
def datasets_page(request):
    return render(request, "dashboard/datasets.html", {"datasets": selectors.dataset_list(user=request.user)})


@login_required
def dataset_new(request):
    def register(data: dict):
        dataset = services.dataset_register(
            owner=request.user,
            name=data["name"],
            format=data["format"],
            path=(data["path"] or "").strip() or None,
            archive=data["archive"] or None,
            concepts=data["concepts"],
            public=data["public"],
        )
        message = f"Dataset {dataset.name} registered: {dataset.image_count} images, {dataset.concept_count} concepts."
        return message, redirect("dashboard-datasets")

    return _register_page(
        request,
        DatasetForm,
        register,
        title="dataset",
        intro="The dataset is opened and checked (images, masks, concepts) before it is saved.",
    )


@login_required
def token_page(request):
    return render(request, "dashboard/token.html", {"token": services.token_get_or_create(user=request.user)})

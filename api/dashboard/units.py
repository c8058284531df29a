"""Unit pages: a layer's gallery, one unit, and the cross-model concept search."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import get_object_or_404, render

from api import selectors
from api.dashboard.common import (
    GALLERY_PAGE_SIZE,
    SEARCH_PAGE_SIZE,
    SORTS,
    STABLE_PCT,
    _category_key,
    _decorate_unit,
    _float_param,
    _page_links,
    _stability_options,
    _stability_param,
    category_colour,
)
from api.dashboard.generators import describe_sources
from api.models import Job, NetworkModel


@login_required
def layer_units_page(request, pk: int, layer: str):
    """The unit gallery of one layer of a job, filtered and sorted by query parameters."""
    user = request.user
    job = get_object_or_404(selectors.job_list(user=user), pk=pk)
    result = job.layer_results.filter(layer=layer).first() if job.status == Job.Status.SUCCEEDED else None
    if result is None:
        raise Http404(f"job {job.pk} has no results for layer {layer}")
    describe_sources(user=user, jobs=[job])
    concept = request.GET.get("concept", "").strip()
    category = request.GET.get("category", "").strip()
    min_iou = _float_param(request, "min_iou")
    min_stability, notice = _stability_param(request)
    sort = request.GET.get("sort", "-iou")
    if sort not in selectors.DASHBOARD_UNIT_ORDERINGS:
        sort = "-iou"
    units = selectors.dashboard_layer_units(
        user=user,
        job=job,
        layer=layer,
        concept=concept,
        category=category,
        min_iou=min_iou,
        min_stability=min_stability,
        ordering=sort,
    )
    page = Paginator(units, GALLERY_PAGE_SIZE).get_page(request.GET.get("page"))
    for unit in page.object_list:
        _decorate_unit(unit)
    labels = selectors.dashboard_layer_labels(job=job, layer=layer)
    concept_counts: dict[str, int] = {}
    categories: dict[str, int] = {}
    for name, cat, n in labels:
        concept_counts[name] = concept_counts.get(name, 0) + n
        categories[cat] = categories.get(cat, 0) + n
    return render(
        request,
        "dashboard/units.html",
        {
            "job": job,
            "layer": layer,
            "result": result,
            "page": page,
            "links": _page_links(request, page),
            "concepts": sorted(concept_counts.items()),
            "categories": [(c, categories[c]) for c in sorted(categories, key=_category_key)],
            "sorts": SORTS,
            "stabilities": _stability_options(min_stability),
            "selected": {
                "concept": concept,
                "category": category,
                "min_iou": "" if min_iou is None else min_iou,
                "sort": sort,
            },
            "filtered": bool(concept or category or min_iou is not None or min_stability is not None),
            "notice": notice,
            "evidence": any(unit.has_evidence for unit in page.object_list),
            "detector_iou": selectors.DETECTOR_MIN_IOU,
            "stable_pct": STABLE_PCT,
        },
    )


@login_required
def unit_page(request, pk: int):
    user = request.user
    unit = _decorate_unit(get_object_or_404(selectors.unit_list(user=user), pk=pk))
    scores = selectors.unit_top_concepts(unit_ids=[unit.pk])[unit.pk]
    top = max((s["iou"] for s in scores), default=0.0) or 1.0
    for score in scores:
        score["colour"] = category_colour(score["category"])
        score["pct"] = round(100 * score["iou"] / top, 1) if top > 0 else 0
    return render(
        request,
        "dashboard/unit.html",
        {
            "unit": unit,
            "scores": scores,
            "neighbours": selectors.dashboard_unit_neighbours(user=user, unit=unit),
            "detector_iou": selectors.DETECTOR_MIN_IOU,
            "stable_pct": STABLE_PCT,
            "generated": unit.model.kind == NetworkModel.Kind.GENERATOR,
        },
    )


@login_required
def search_page(request):
    """Units of every visible model labelled with a concept, best IoU first."""
    user = request.user
    concept = request.GET.get("concept", "").strip()
    min_iou = _float_param(request, "min_iou")
    page = None
    links = {}
    if concept:
        units = selectors.dashboard_unit_search(user=user, concept=concept, min_iou=min_iou)
        page = Paginator(units, SEARCH_PAGE_SIZE).get_page(request.GET.get("page"))
        for unit in page.object_list:
            _decorate_unit(unit)
        links = _page_links(request, page)
    found = page is not None and page.paginator.count > 0
    if found:
        concept = page.object_list[0].label_name
    suggestions = [] if found else selectors.dashboard_concept_suggestions(user=user, text=concept)
    for suggestion in suggestions:
        suggestion["colour"] = category_colour(suggestion["category"])
    return render(
        request,
        "dashboard/search.html",
        {
            "concept": concept,
            "min_iou": "" if min_iou is None else min_iou,
            "page": page,
            "links": links,
            "suggestions": suggestions,
            "evidence": found and any(unit.has_evidence for unit in page.object_list),
            "detector_iou": selectors.DETECTOR_MIN_IOU,
            "stable_pct": STABLE_PCT,
        },
    )

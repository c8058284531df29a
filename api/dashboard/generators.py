"""Dashboard views of generators: where a job's images came from, the removal curve (Figure 4a-b),
the insertion map (Figure 4d) as server-side SVG, and the painting page (Figure 6).

Reads only: rows come through api.selectors or read-only ORM queries here; painting itself is
done by the browser calling ``POST /api/models/{id}/paint/``.
"""

from __future__ import annotations

import math

from django.contrib.auth.decorators import login_required
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.safestring import mark_safe

from api import selectors
from api.models import Job, NetworkModel, Unit

PLOT_W, PLOT_H, LEFT, TOP = 560, 220, 56, 14
HEAT_SIDE = 360
# Yellow to dark red (ColorBrewer YlOrRd): more of the concept added, darker.
HEAT_STOPS = ["#ffffcc", "#fed976", "#fd8d3c", "#e31a1c", "#800026"]
UNTESTED = "#e5e7eb"


# Where a job's images come from


def segmenter_names(*, user, jobs) -> dict[int, str]:
    """Names of the visible segmenter models that label the images of some generator jobs."""
    ids = {job.params.get("concepts") for job in jobs if job.dataset_id is None}
    ids = {i for i in ids if isinstance(i, int) and not isinstance(i, bool)}
    if not ids:
        return {}
    return dict(selectors.model_list(user=user).filter(pk__in=ids).values_list("pk", "name"))


def source_text(job: Job, names: dict[int, str], *, short: bool = False) -> str:
    """What a job ran on: its dataset's name, or for a generator job its generated samples and
    where their concept labels come from ("generated: 200 samples, concepts: colours"; short:
    "200 generated, colours")."""
    if job.dataset_id is not None:
        return job.dataset.name
    params = job.params or {}
    concepts = params.get("concepts", "colors")
    if concepts == "colors":
        labels = "colours"
    else:
        labels = f"segmenter {names.get(concepts, f'#{concepts}')}"
    samples = params.get("samples")
    if short:
        return f"{samples} generated, {labels}" if samples else f"generated, {labels}"
    return f"generated: {samples} samples, concepts: {labels}" if samples else f"generated, concepts: {labels}"


def describe_sources(*, user, jobs) -> None:
    """Set ``job.source`` and ``job.source_short`` (see :func:`source_text`) on each job, with one
    query for segmenter names."""
    names = segmenter_names(user=user, jobs=jobs)
    for job in jobs:
        job.source = source_text(job, names)
        job.source_short = source_text(job, names, short=True)


# Dissected layers and their concepts (the painting page, the job form)


def dissected_layers(*, model: NetworkModel, user) -> list[dict]:
    """The model's layers that have a succeeded visible dissection, in network order, each with
    its latest dissection and that dissection's unit labels ranked by unit count.

    Returns:
        [{"name", "height", "width", "units", "dissection", "concepts": [{"name", "category", "units"}]}]
    """
    latest = selectors.dashboard_latest_layer_results(model=model, user=user)
    if not latest:
        return []
    entries = {entry["name"]: entry for entry in model.layers or []}
    labels: dict[tuple[int, str], list[dict]] = {(r.job_id, r.layer): [] for r in latest.values()}
    which = Q()
    for r in latest.values():
        which |= Q(job_id=r.job_id, layer=r.layer)
    rows = (
        Unit.objects.filter(which, label__isnull=False)
        .order_by()
        .values_list("job_id", "layer", "label__name", "label__category")
        .annotate(n=Count("id"))
    )
    for job_id, layer, name, category, n in rows:
        labels[(job_id, layer)].append({"name": name, "category": category, "units": n})
    out = []
    for name, entry in entries.items():
        result = latest.get(name)
        if result is None:
            continue
        concepts = sorted(labels[(result.job_id, name)], key=lambda c: (-c["units"], c["name"]))
        out.append(
            {
                "name": name,
                "height": entry.get("height"),
                "width": entry.get("width"),
                "units": entry.get("units") or result.units,
                "dissection": result.job_id,
                "concepts": concepts,
            }
        )
    return out


# Charts


def nice_top(value: float) -> tuple[float, float]:
    """An axis maximum at or above ``value`` and a step that divides it into 4 to 6 parts."""
    if value <= 0 or not math.isfinite(value):
        return 1.0, 0.25
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0):
        step *= magnitude
        if value / step <= 5:
            return step * math.ceil(value / step - 1e-9), step
    return 10 * magnitude, 2 * magnitude


def _percent(value: float | None, top: float = 1.0) -> str:
    """0.1234 as 12.3%; small scales get more digits."""
    if value is None:
        return "–"
    digits = 2 if top < 0.02 else 1
    return f"{100 * value:.{digits}f}%"


def _removal_rows(summary: dict, params: dict) -> list[dict]:
    """[{"k", "share", "change"}], from ``curve`` or from the core's lists (ks, fractions, relative_change)."""
    if summary.get("curve"):
        return [
            {"k": int(row["k"]), "share": row.get("share"), "change": row.get("change")} for row in summary["curve"]
        ]
    ks = summary.get("ks") or params.get("ks") or []
    shares = summary.get("fractions") or []
    changes = summary.get("relative_change") or [None] * len(shares)
    return [{"k": int(k), "share": s, "change": c} for k, s, c in zip(ks, shares, changes)]


def removal_chart(rows: list[dict], baseline: float) -> dict:
    """Figure 4a: the share of pixels showing the concept against k removed units, from k = 0 (the baseline)."""
    points = [(0, baseline)] + [(r["k"], r["share"]) for r in rows if r["share"] is not None]
    kmax = max((k for k, _ in points), default=1) or 1
    top, step = nice_top(max((v for _, v in points), default=0.0) * 1.08)
    if top > 1.0:  # a share of pixels: the axis ends at 100%
        top, step = 1.0, 0.25

    def x(k: float) -> float:
        return round(LEFT + PLOT_W * k / kmax, 1)

    def y(v: float) -> float:
        return round(TOP + PLOT_H - PLOT_H * v / top, 1)

    if len(points) <= 13:
        xticks = sorted({k for k, _ in points})
    else:
        _, kstep = nice_top(kmax)
        xticks = [round(i * kstep) for i in range(int(kmax // kstep) + 1)]
    yticks = [i * step for i in range(round(top / step) + 1)]
    return {
        "width": LEFT + PLOT_W + 24,
        "height": TOP + PLOT_H + 40,
        "left": LEFT,
        "right": LEFT + PLOT_W,
        "axis_y": TOP + PLOT_H,
        "mid_y": TOP + PLOT_H / 2,
        "line": " ".join(f"{x(k)},{y(v)}" for k, v in points),
        "dots": [
            {
                "x": x(k),
                "y": y(v),
                "k": k,
                "share": _percent(v, top),
                "change": _percent((v - baseline) / baseline) if baseline else "–",
            }
            for k, v in points[1:]
        ],
        "start": {"x": x(0), "y": y(baseline), "share": _percent(baseline, top)},
        "baseline": y(baseline),
        "xticks": [{"x": x(k), "k": k} for k in xticks],
        "yticks": [{"y": y(v), "v": _percent(v, top)} for v in yticks],
    }


def _unit_rows(*, user, summary: dict, params: dict, values: list | None = None) -> list[dict]:
    """Ranked units with their IoU (and inserted value), linked to their unit pages when the
    dissection's rows are visible."""
    units = summary.get("units") or []
    ious = summary.get("unit_iou") or []
    layer = summary.get("layer") or params.get("layer")
    pages: dict[int, tuple[int, str]] = {}
    dissection = params.get("dissection")
    if units and isinstance(dissection, int):
        found = selectors.unit_list(user=user).filter(job_id=dissection, layer=layer, unit__in=units)
        pages = {u.unit: (u.pk, u.label_name) for u in found.select_related(None).only("id", "unit", "label_name")}
    rows = []
    for rank, unit in enumerate(units):
        pk, label = pages.get(unit, (None, ""))
        rows.append(
            {
                "rank": rank + 1,
                "unit": unit,
                "iou": ious[rank] if rank < len(ious) else None,
                "value": values[rank] if values and rank < len(values) else None,
                "pk": pk,
                "label": label,
            }
        )
    return rows


def _images(job: Job, summary: dict) -> dict | None:
    """The API addresses of the job's before/after sample grids (the API's job-images route)."""
    names = summary.get("images") or {}
    if not names.get("before") or not names.get("after"):
        return None
    return {key: reverse("job-images", kwargs={"pk": job.pk, "name": names[key]}) for key in ("before", "after")}


def removal_context(job: Job, *, user) -> dict:
    """Everything the job page shows for a succeeded generator_remove job."""
    summary, params = job.summary or {}, job.params or {}
    rows = _removal_rows(summary, params)
    baseline = float(summary.get("baseline") or 0.0)
    top = max([baseline] + [r["share"] for r in rows if r["share"] is not None])
    for row in rows:
        row["share_text"] = _percent(row["share"], top)
        change = row["change"]
        row["change_text"] = "–" if change is None else f"{100 * change:+.1f}%".replace("-0.0%", "+0.0%")
        if change is None:
            row["effect"] = ""
        elif round(100 * change, 1) < 0:
            row["effect"] = f"{-100 * change:.1f}% of its pixels are gone"
        elif round(100 * change, 1) > 0:
            row["effect"] = f"{100 * change:.1f}% more of its pixels than before"
        else:
            row["effect"] = "no change"
    largest = max((r["k"] for r in rows), default=0)
    return {
        "concept": summary.get("concept") or params.get("concept", ""),
        "layer": summary.get("layer") or params.get("layer", ""),
        "samples": summary.get("samples") or summary.get("count") or params.get("samples"),
        "baseline": baseline,
        "baseline_text": _percent(baseline, top),
        "rows": rows,
        "largest": largest,
        "at_largest": next((r for r in rows if r["k"] == largest), None),
        "chart": removal_chart(rows, baseline) if rows else None,
        "units": _unit_rows(user=user, summary=summary, params=params),
        "dissection": params.get("dissection"),
        "images": _images(job, summary),
    }


def _heat_colour(t: float) -> str:
    """A colour of HEAT_STOPS for t in [0, 1], interpolated."""
    t = min(1.0, max(0.0, t)) * (len(HEAT_STOPS) - 1)
    i = min(int(t), len(HEAT_STOPS) - 2)
    f = t - i
    a, b = HEAT_STOPS[i], HEAT_STOPS[i + 1]
    channels = [round(int(a[j : j + 2], 16) * (1 - f) + int(b[j : j + 2], 16) * f) for j in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in channels)


def insertion_map(summary: dict, params: dict) -> dict | None:
    """Figure 4d: one square per tested feature-map position, coloured by the share of image pixels that
    newly show the concept when the units are set high there; the best position outlined.

    The cells are written here as one SVG string (only numbers and colours go into it): a 64x64
    map is 4096 rectangles, too many for a template loop to stay fast.
    """
    grid = summary.get("map") or []
    rows = len(grid)
    cols = max((len(r) for r in grid), default=0)
    if not rows or not cols:
        return None
    positions = summary.get("positions") or {}
    stride = int(positions.get("stride") or params.get("stride") or 1)
    size = int(positions.get("size") or params.get("size") or 1)
    # Feature-map coordinates of the map's rows and columns (tested every stride-th position).
    ys = positions.get("rows") if len(positions.get("rows") or []) == rows else [r * stride for r in range(rows)]
    xs = positions.get("cols") if len(positions.get("cols") or []) == cols else [c * stride for c in range(cols)]
    values = [v for row in grid for v in row if v is not None and math.isfinite(v)]
    top = max(values, default=0.0)
    best = summary.get("best") or {}
    by = ys.index(best["y"]) if best.get("y") in ys else None
    bx = xs.index(best["x"]) if best.get("x") in xs else None
    if (by is None or bx is None or bx >= len(grid[by]) or grid[by][bx] is None) and values:
        by, bx = max(
            ((r, c) for r in range(rows) for c in range(len(grid[r])) if grid[r][c] is not None),
            key=lambda rc: (grid[rc[0]][rc[1]], -rc[0], -rc[1]),
        )
        best = {}
    cell = max(3, min(72, HEAT_SIDE // max(rows, cols)))
    left, top_pad = 34, 6
    parts = []
    for r, row in enumerate(grid):
        for c, v in enumerate(row):
            x, y = left + c * cell, top_pad + r * cell
            if v is None or not math.isfinite(v):
                colour, text = UNTESTED, "not tested"
            else:
                colour, text = _heat_colour(v / top if top > 0 else 0.0), f"added {_percent(v, top)}"
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{colour}">'
                f"<title>y {ys[r]}, x {xs[c]}: {text}</title></rect>"
            )
    best_cell = None
    if by is not None and bx is not None and top > 0:
        best_cell = {
            "x": left + bx * cell,
            "y": top_pad + by * cell,
            "size": cell,
            "row": by,
            "col": bx,
            "fy": ys[by],
            "fx": xs[bx],
            "added": _percent(best.get("added", grid[by][bx]), top),
        }
    width, height = left + cols * cell, top_pad + rows * cell
    legend_y = height + 30
    return {
        "cells": mark_safe("".join(parts)),
        "rows": rows,
        "cols": cols,
        "cell": cell,
        "left": left,
        "top": top_pad,
        "right": width,
        "bottom": height,
        "mid_y": top_pad + rows * cell / 2,
        "mid_x": left + cols * cell / 2,
        "width": max(width, left + 240) + 12,
        "height": legend_y + 34,
        "stride": stride,
        "size": size,
        "tested": len(values),
        "feature": {"height": positions.get("height") or ys[-1] + 1, "width": positions.get("width") or xs[-1] + 1},
        "max": _percent(top, top) if top > 0 else "0%",
        "best": best_cell,
        "legend": {
            "x": left,
            "y": legend_y,
            "w": 200,
            "stops": [
                {"offset": round(100 * i / (len(HEAT_STOPS) - 1)), "colour": c} for i, c in enumerate(HEAT_STOPS)
            ],
        },
        "first_y": ys[0],
        "first_x": xs[0],
        "last_y": ys[-1],
        "last_x": xs[-1],
    }


def insertion_context(job: Job, *, user) -> dict:
    """Everything the job page shows for a succeeded generator_insert job."""
    summary, params = job.summary or {}, job.params or {}
    mean = summary.get("mean_added", summary.get("mean_fraction"))
    grid = insertion_map(summary, params)
    top = max((v for row in summary.get("map") or [] for v in row if v is not None and math.isfinite(v)), default=0.0)
    return {
        "concept": summary.get("concept") or params.get("concept", ""),
        "layer": summary.get("layer") or params.get("layer", ""),
        "samples": summary.get("samples") or summary.get("count") or params.get("samples"),
        "map": grid,
        "mean_added": _percent(mean, top or 1.0) if mean is not None else "–",
        "added_any": top > 0,
        "units": _unit_rows(user=user, summary=summary, params=params, values=summary.get("values")),
        "dissection": params.get("dissection"),
        "images": _images(job, summary),
    }


def generator_context(job: Job, *, user) -> dict | None:
    """The generator section of a job page (None for other jobs and before success)."""
    if job.status != Job.Status.SUCCEEDED:
        return None
    if job.type == Job.Type.GENERATOR_REMOVE:
        return {"removal": removal_context(job, user=user)}
    if job.type == Job.Type.GENERATOR_INSERT:
        return {"insertion": insertion_context(job, user=user)}
    return None


# The painting page


@login_required
def paint_page(request, pk: int):
    """Figure 6: paint where a concept should appear (or vanish) on a generated image."""
    model = get_object_or_404(selectors.model_list(user=request.user), pk=pk)
    layers = dissected_layers(model=model, user=request.user) if model.kind == NetworkModel.Kind.GENERATOR else []
    wanted = {
        "layer": request.GET.get("layer", ""),
        "concept": request.GET.get("concept", ""),
        "seed": request.GET.get("seed", "0") if request.GET.get("seed", "0").isdigit() else "0",
        "index": request.GET.get("index", "0") if request.GET.get("index", "0").isdigit() else "0",
    }
    return render(
        request,
        "dashboard/paint.html",
        {
            "model": model,
            "is_generator": model.kind == NetworkModel.Kind.GENERATOR,
            "layers": layers,
            "paint_data": {
                "model": model.pk,
                "endpoint": reverse("model-paint", kwargs={"pk": model.pk}) + "?as=json",
                "layers": layers,
                "wanted": wanted,
            },
        },
    )

"""Dashboard views of the classifier-role jobs: ablation curves (Figure 2b-d), importance vs IoU
(Figure 2e) and the attack analysis (Figure 5c), drawn as server-side SVG."""

from __future__ import annotations

from api import selectors
from api.models import Job

PLOT_W, PLOT_H, LEFT, TOP = 420, 200, 44, 12


def _y(value: float, lo: float, hi: float) -> float:
    return round(TOP + PLOT_H - PLOT_H * (value - lo) / (hi - lo or 1.0), 1)


def curve_chart(ks: list[int], series: list[dict], *, baseline: float | None) -> dict:
    """Balanced accuracy against k (equally spaced k), one polyline per series, 0.5..1 scale."""
    lo, hi = 0.4, 1.0
    step = PLOT_W / max(1, len(ks) - 1)
    xs = [round(LEFT + i * step, 1) for i in range(len(ks))]
    lines = []
    for s in series:
        points = [(x, _y(v, lo, hi)) for x, v in zip(xs, s["values"]) if v is not None]
        lines.append(
            {**s, "points": " ".join(f"{x},{y}" for x, y in points), "dots": [{"x": x, "y": y} for x, y in points]}
        )
    return {
        "width": LEFT + PLOT_W + 20,
        "height": TOP + PLOT_H + 34,
        "lines": lines,
        "xticks": [{"x": x, "k": k} for x, k in zip(xs, ks)],
        "axis_y": TOP + PLOT_H,
        "left": LEFT,
        "right": LEFT + PLOT_W,
        "yticks": [{"y": _y(v, lo, hi), "v": f"{v:.1f}"} for v in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)],
        "baseline": _y(baseline, lo, hi) if baseline is not None else None,
        "chance": _y(0.5, lo, hi),
    }


def scatter_chart(xs: list[int], ys: list[float]) -> dict:
    """Figure 2e: classes for which a unit is among the 4 most important (x) against its IoU (y)."""
    top_x = max(xs, default=1) or 1
    top_y = max(max(ys, default=0.0), 0.05)
    points = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        jitter = ((i * 37) % 11 - 5) * 1.2
        points.append(
            {
                "x": round(LEFT + 10 + (PLOT_W - 20) * x / top_x + jitter, 1),
                "y": _y(y, 0.0, top_y),
                "unit": i,
                "n": x,
                "iou": y,
            }
        )
    return {
        "width": LEFT + PLOT_W + 20,
        "height": TOP + PLOT_H + 34,
        "points": points,
        "axis_y": TOP + PLOT_H,
        "left": LEFT,
        "right": LEFT + PLOT_W,
        "xticks": [{"x": round(LEFT + 10 + (PLOT_W - 20) * n / top_x, 1), "n": n} for n in range(top_x + 1)],
        "yticks": [{"y": _y(top_y * f, 0.0, top_y), "v": f"{top_y * f:.2f}"} for f in (0, 0.5, 1.0)],
    }


def ablation_context(job: Job, chosen: str | None) -> dict:
    """Everything the job page shows for a succeeded ablate job."""
    summary = job.summary or {}
    classes = summary.get("classes", [])
    curves = list(job.curves.all().order_by("class_index", "k"))
    ks = sorted({c.k for c in curves})
    by_class: dict[str, dict[int, object]] = {}
    for c in curves:
        by_class.setdefault(c.class_name, {})[c.k] = c
    tested = [name for name in classes if name in by_class]
    chosen = chosen if chosen in by_class else (tested[0] if tested else None)
    context: dict = {"ablation": True, "classes": tested, "chosen": chosen, "summary": summary}
    if chosen:
        rows = by_class[chosen]
        context["curve"] = curve_chart(
            ks,
            [
                {
                    "name": "remove the k most important",
                    "colour": "#b91c1c",
                    "values": [rows[k].removed_top for k in ks],
                },
                {
                    "name": "remove all but the k most important",
                    "colour": "#1d4ed8",
                    "values": [rows[k].kept_top for k in ks],
                },
            ],
            baseline=next(iter(rows.values())).baseline,
        )
        context["important"] = selectors.important_units(job=job, class_name=chosen, limit=8)
    mean = []
    for k in ks:
        removed = [by_class[n][k].removed_top for n in tested if by_class[n][k].removed_top is not None]
        kept = [by_class[n][k].kept_top for n in tested if by_class[n][k].kept_top is not None]
        mean.append((k, sum(removed) / len(removed) if removed else None, sum(kept) / len(kept) if kept else None))
    base = [by_class[n][ks[0]].baseline for n in tested if ks and by_class[n][ks[0]].baseline is not None]
    if ks:
        context["mean_curve"] = curve_chart(
            ks,
            [
                {"name": "remove the k most important", "colour": "#b91c1c", "values": [m[1] for m in mean]},
                {"name": "remove all but the k most important", "colour": "#1d4ed8", "values": [m[2] for m in mean]},
            ],
            baseline=sum(base) / len(base) if base else None,
        )
    k20 = max((k for k in ks if k <= 20), default=None)
    context["k20"] = k20
    context["per_class"] = (
        [
            {
                "name": n,
                "baseline": by_class[n][k20].baseline,
                "removed": by_class[n][k20].removed_top,
                "kept": by_class[n][k20].kept_top,
            }
            for n in tested
        ]
        if k20
        else []
    )
    interp = summary.get("interpretability")
    if interp:
        context["scatter"] = scatter_chart(interp["classes_in_top4"], interp["iou"])
        context["correlation"] = interp.get("correlation")
    return context


def unit_classifier_context(summary: dict) -> dict:
    """Figure 1f: peak activations on images with and without the concept, and the best threshold."""
    with_, without = summary.get("peaks_with", []), summary.get("peaks_without", [])
    values = with_ + without + [summary.get("threshold", 0.0)]
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    span = (hi - lo) or 1.0

    def x(v: float) -> float:
        return round(LEFT + 10 + (PLOT_W - 20) * (v - lo) / span, 1)

    rows = []
    for r, (name, peaks) in enumerate((("with", with_), ("without", without))):
        y0 = TOP + 20 + r * 80
        rows.append(
            {
                "name": name,
                "y": y0 + 30,
                "points": [{"x": x(v), "y": round(y0 + ((i * 37) % 41) * 1.4, 1)} for i, v in enumerate(peaks)],
            }
        )
    return {
        **summary,
        "plot": {
            "width": LEFT + PLOT_W + 20,
            "height": TOP + 200,
            "rows": rows,
            "tx": x(summary.get("threshold", 0.0)),
            "top": TOP,
            "bottom": TOP + 180,
            "lo": lo,
            "hi": hi,
            "left": LEFT + 10,
            "right": LEFT + PLOT_W - 10,
        },
    }

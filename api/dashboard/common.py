"""What the dashboard's pages share: category colours, durations, job and unit decorations,
query parameters, and showing a service error on a form."""

from __future__ import annotations

import math
import zlib

from django import forms

from api import selectors
from api.errors import ApplicationError
from api.models import STABLE_LABEL_MIN, Job

GALLERY_PAGE_SIZE = 256


SEARCH_PAGE_SIZE = 60


JOBS_SHOWN = 100


CATEGORY_ORDER = ["object", "part", "material", "color", "colour", "scene", "texture"]


CATEGORY_COLOURS = {
    "object": "#4e79a7",
    "part": "#f28e2b",
    "material": "#59a14f",
    "color": "#e15759",
    "colour": "#e15759",
    "scene": "#b07aa1",
    "texture": "#76b7b2",
}


OTHER_COLOURS = ["#edc948", "#9c755f", "#ff9da7", "#8c8c8c", "#17becf", "#bcbd22"]


STABILITY_BARS = [0.5, 0.8, 0.9, 0.95]


STABLE_PCT = round(100 * STABLE_LABEL_MIN)


SORTS = [("-iou", "IoU, highest first"), ("iou", "IoU, lowest first"), ("unit", "unit number"), ("concept", "concept")]


def category_colour(category: str) -> str:
    if category in CATEGORY_COLOURS:
        return CATEGORY_COLOURS[category]
    return OTHER_COLOURS[zlib.crc32(category.encode()) % len(OTHER_COLOURS)]


def _category_key(category: str) -> tuple[int, str]:
    return (CATEGORY_ORDER.index(category) if category in CATEGORY_ORDER else len(CATEGORY_ORDER), category)


def _duration(seconds: float | None) -> str:
    """12 s, 3 min 05 s, 2 h 10 min."""
    if seconds is None:
        return ""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _decorate_job(job: Job) -> Job:
    """Attach the display values the job templates read (percent, time left, run time)."""
    job.percent = round(100 * (job.progress or 0.0))
    job.active = not job.is_final
    if job.status == Job.Status.RUNNING:
        job.time_left = _duration(job.eta_seconds) if job.eta_seconds is not None else "estimating"
    elif job.status == Job.Status.QUEUED:
        job.time_left = "waiting for a worker"
    else:
        job.time_left = ""
    job.waited = _duration((job.started - job.created).total_seconds()) if job.started else ""
    job.ran = _duration((job.finished - job.started).total_seconds()) if job.started and job.finished else ""
    return job


def _float_param(request, name: str) -> float | None:
    raw = request.GET.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _stability_param(request) -> tuple[float | None, str]:
    """The ``min_stability`` bar (None: any) and, for a value that is not a number from 0 to 1,
    a notice saying it was ignored."""
    raw = request.GET.get("min_stability", "").strip()
    if raw in ("", "any"):
        return None, ""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        return None, f"The stability bar must be a number from 0 to 1, not “{raw[:40]}”: every label is counted."
    return value, ""


def _percent(share: float) -> str:
    """0.9 -> "90%", 0.855 -> "85.5%" (rounded down, so that a share below a bar never reads as it)."""
    return f"{math.floor(1000 * share + 1e-6) / 10:g}%"


def _stability_options(value: float | None) -> list[dict]:
    """The stability bar's choices for a select (``value`` among them when it is not one)."""
    bars = sorted(set(STABILITY_BARS) | ({value} if value is not None else set()))
    return [{"value": "", "text": "any", "selected": value is None}] + [
        {"value": f"{bar:g}", "text": f"≥ {_percent(bar)}", "selected": bar == value} for bar in bars
    ]


def _add_service_error(form: forms.Form, exc: ApplicationError) -> None:
    form.add_error(None, exc.message)
    for key, value in (exc.extra or {}).items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        form.add_error(None, f"{key}: {value}")


def _decorate_unit(unit):
    unit.colour = category_colour(unit.label.category) if unit.label_id else "#9ca3af"
    unit.strip_ratio = max(1, len(unit.top_images or []))
    unit.detector = unit.iou >= selectors.DETECTOR_MIN_IOU
    _decorate_evidence(unit)
    return unit


def _decorate_evidence(unit) -> None:
    """The display values of a label's evidence (docs/evidence.md); all falsy without evidence."""
    stability = unit.stability
    unit.has_evidence = stability is not None or unit.iou_low is not None
    unit.stability_pct = _percent(stability) if stability is not None else ""
    unit.unstable = stability is not None and stability < STABLE_LABEL_MIN
    unit.margin = unit.iou - unit.runner_up_iou if unit.runner_up_iou is not None else None
    unit.runner_up_colour = category_colour(unit.runner_up.category) if unit.runner_up_id else ""
    unit.p_text = _p_text(unit.p_value)


def _p_text(p: float | None) -> str:
    """A p-value in two significant digits ("0.23", "3.2e-05"; "< 1e-10" below that)."""
    if p is None:
        return ""
    return "< 1e-10" if p < 1e-10 else f"{p:.2g}"


def _page_links(request, page) -> dict:
    """Query strings of the previous and next pages, keeping the other parameters."""

    def link(number):
        query = request.GET.copy()
        query["page"] = number
        return "?" + query.urlencode()

    return {
        "previous": link(page.previous_page_number()) if page.has_previous() else None,
        "next": link(page.next_page_number()) if page.has_next() else None,
    }

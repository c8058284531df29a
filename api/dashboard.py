"""Server-rendered dashboard pages (behind login).

Reads go through api.selectors, writes through api.services; a service's
ApplicationError is shown on the form that caused it. Charts are SVG drawn by the
templates from the geometry computed here (no JavaScript, nothing fetched).
"""

from __future__ import annotations

import math
import re
import zlib

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from api import selectors, services
from api.dashboard_generators import describe_sources, dissected_layers, generator_context
from api.dashboard_roles import ablation_context, unit_classifier_context
from api.errors import ApplicationError
from api.models import Dataset, Job, NetworkModel

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


# Jobs


def _job_rows(request):
    status = request.GET.get("status", "")
    if status != "active" and status not in Job.Status.values:
        status = ""
    jobs = [_decorate_job(job) for job in selectors.dashboard_job_list(user=request.user, status=status)[:JOBS_SHOWN]]
    describe_sources(user=request.user, jobs=jobs)
    return status, jobs


def _jobs_context(request) -> dict:
    status, jobs = _job_rows(request)
    counts = selectors.dashboard_job_counts(user=request.user)
    filters = [("", "all", sum(counts.values())),
               ("active", "active", counts.get("queued", 0) + counts.get("running", 0))]
    filters += [(s, s, counts.get(s, 0)) for s in ("succeeded", "failed", "cancelled")]
    return {"jobs": jobs, "status": status, "filters": filters, "shown": JOBS_SHOWN}


@login_required
def jobs_page(request):
    return render(request, "dashboard/jobs.html", _jobs_context(request))


@login_required
def jobs_live_fragment(request):
    """The filter tabs and the job table, for the list page to poll."""
    return render(request, "dashboard/_jobs_live.html", _jobs_context(request))


@login_required
def job_page(request, pk: int):
    job = _decorate_job(get_object_or_404(selectors.job_list(user=request.user), pk=pk))
    describe_sources(user=request.user, jobs=[job])
    layers = []
    if job.status == Job.Status.SUCCEEDED:
        for row in job.layer_results.all():
            summary = row.summary or {}
            by_category = summary.get("detectors_by_category", {})
            unique = summary.get("unique_concepts_by_category", {})
            top = sorted((summary.get("concept_units") or {}).items(), key=lambda kv: (-kv[1], kv[0]))[:6]
            layers.append({
                "name": row.layer,
                "units": row.units,
                "detectors": summary.get("detectors", 0),
                "unique": summary.get("unique_concepts", 0),
                "min_iou": summary.get("min_iou", selectors.DETECTOR_MIN_IOU),
                "categories": [
                    {"name": c, "detectors": by_category[c], "unique": unique.get(c, 0), "colour": category_colour(c)}
                    for c in sorted(by_category, key=_category_key)
                ],
                "top": top,
            })
    params = [(key, ", ".join(map(str, value)) if isinstance(value, list) else value)
              for key, value in sorted(job.params.items())]
    roles = {}
    if job.status == Job.Status.SUCCEEDED and job.type == Job.Type.ABLATE:
        roles = ablation_context(job, request.GET.get("class"))
    return render(request, "dashboard/job.html", {
        "job": job,
        "params": params,
        "layers": layers,
        "roles": roles,
        "attack": job.summary if job.status == Job.Status.SUCCEEDED and job.type == Job.Type.ATTACK else None,
        "unit_classifier": unit_classifier_context(job.summary)
        if job.status == Job.Status.SUCCEEDED and job.type == Job.Type.UNIT_CLASSIFIER else None,
        "generator": generator_context(job, user=request.user),
        "can_cancel": job.owner_id == request.user.pk and not job.is_final,
    })


@login_required
@require_POST
def job_cancel(request, pk: int):
    job = get_object_or_404(selectors.job_list(user=request.user).filter(owner=request.user), pk=pk)
    try:
        services.job_cancel(job=job)
        messages.success(request, f"Job {job.pk} cancelled.")
    except ApplicationError as exc:
        messages.error(request, exc.message)
    return redirect("dashboard-job", pk=job.pk)


@login_required
@require_POST
def job_rerun(request, pk: int):
    """A new job with the same type, model, dataset and parameters."""
    job = get_object_or_404(selectors.job_list(user=request.user), pk=pk)
    model = get_object_or_404(selectors.model_list(user=request.user), pk=job.model_id)
    dataset = None
    if job.dataset_id is not None:
        dataset = get_object_or_404(selectors.dataset_list(user=request.user), pk=job.dataset_id)
    params = dict(job.params)
    if job.type in (Job.Type.GENERATOR_REMOVE, Job.Type.GENERATOR_INSERT):
        # The concept source is the dissection's: the service derives it and takes no "concepts" param.
        params.pop("concepts", None)
    try:
        new = services.job_create(owner=request.user, type=job.type, model=model, dataset=dataset, params=params)
    except ApplicationError as exc:
        messages.error(request, exc.message)
        return redirect("dashboard-job", pk=job.pk)
    messages.success(request, f"Job {new.pk} submitted: a re-run of job {job.pk}.")
    return redirect("dashboard-job", pk=new.pk)


JOB_TYPES = [
    (Job.Type.DISSECT, "dissect: label every unit with the concept it detects (Figure 1)"),
    (Job.Type.ABLATE, "ablate: the units each class depends on (classifiers, Figure 2)"),
    (Job.Type.ATTACK, "attack: unit changes under adversarial attack (classifiers, Figure 5)"),
    (Job.Type.UNIT_CLASSIFIER, "unit classifier: one unit as a concept detector (classifiers, Figure 1f)"),
    (Job.Type.GENERATOR_REMOVE, "remove: switch off a concept's units (generators, Figure 4a-b)"),
    (Job.Type.GENERATOR_INSERT, "insert: where units can add a concept (generators, Figure 4d)"),
]
# The form fields that make each job type's params, for classifiers (and segmenters) and for
# generators; the page shows only these (the rest stay hidden and are ignored).
JOB_FIELDS = {
    Job.Type.DISSECT: {"classifier": ["layers", "quantile", "max_images"],
                       "generator": ["layers", "quantile", "samples", "seed", "concepts"]},
    Job.Type.ABLATE: {"classifier": ["layer", "ks", "max_images"]},
    Job.Type.ATTACK: {"classifier": ["layer", "eps", "iterations", "max_images", "seed"]},
    Job.Type.UNIT_CLASSIFIER: {"classifier": ["layer", "unit", "concept", "max_images"]},
    Job.Type.GENERATOR_REMOVE: {"generator": ["layer", "concept", "ks", "samples", "seed", "sample_images",
                                              "dissection"]},
    Job.Type.GENERATOR_INSERT: {"generator": ["layer", "concept", "k", "insert_quantile", "samples", "seed",
                                              "stride", "size", "dissection"]},
}
PARAM_KEYS = {"insert_quantile": "quantile"}


def _job_fields(type_: str, kind: str) -> list[str]:
    """The param fields of a job type on a model kind (a type meant for the other kind keeps its own
    fields, so that the service can say why it does not apply)."""
    spec = JOB_FIELDS.get(type_, {})
    key = "generator" if kind == NetworkModel.Kind.GENERATOR else "classifier"
    return spec.get(key) or next(iter(spec.values()), [])


def _numbers(text: str) -> list[int] | None:
    items = [item for item in re.split(r"[,\s]+", text or "") if item]
    if not items:
        return None
    try:
        return [int(item) for item in items]
    except ValueError:
        raise forms.ValidationError("Whole numbers separated by commas or spaces.") from None


class JobForm(forms.Form):
    type = forms.ChoiceField(choices=JOB_TYPES, initial=Job.Type.DISSECT, required=False, label="Job type")
    model = forms.ModelChoiceField(queryset=NetworkModel.objects.none())
    dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.none(), required=False,
        help_text="Classifier jobs run on a dataset; generator jobs generate their own images.",
    )
    layers = forms.CharField(
        required=False, max_length=5000,
        help_text="Layer names separated by commas or spaces. Empty: the model's last convolution "
                  "(generators: give at least one).",
    )
    layer = forms.CharField(
        required=False, max_length=200, help_text="One layer of the model.",
        widget=forms.TextInput(attrs={"list": "layer-names", "autocomplete": "off"}),
    )
    concept = forms.CharField(
        required=False, max_length=200, widget=forms.TextInput(attrs={"list": "concept-names", "autocomplete": "off"}),
        help_text="A concept name: for removal and insertion one of the layer's dissection (e.g. a colour).",
    )
    quantile = forms.FloatField(
        required=False, initial=0.99, min_value=0.0, max_value=1.0,
        help_text="A unit is on where its activation exceeds this quantile of its activations (paper: 0.99).",
    )
    max_images = forms.IntegerField(required=False, min_value=1, help_text="Optional: use only the first N images.")
    samples = forms.IntegerField(
        required=False, min_value=1,
        help_text="Images to generate. Default: 1000 for a dissection, 200 for removal, 32 for insertion.",
    )
    seed = forms.IntegerField(required=False, min_value=0, help_text="Seed of the latents (or of the attack).")
    concepts = forms.ChoiceField(
        required=False, label="Concepts from",
        help_text="What labels the generated pixels: colours, or a registered segmenter model.",
    )
    ks = forms.CharField(
        required=False, max_length=1000, label="k values",
        help_text="Numbers of units to remove, e.g. 1, 2, 4, 8, 12, 16, 20. Empty: the default steps.",
    )
    k = forms.IntegerField(required=False, min_value=1, label="k (units)", help_text="How many of the concept's best units to set (default 20).")
    insert_quantile = forms.FloatField(
        required=False, min_value=0.0, max_value=1.0, label="Insertion quantile",
        help_text="Each unit is set to this quantile of its activations (default 0.995).",
    )
    stride = forms.IntegerField(required=False, min_value=1, help_text="Test every stride-th feature-map position (default 1).")
    size = forms.IntegerField(required=False, min_value=1, help_text="Side of the square of positions set (default 1).")
    sample_images = forms.IntegerField(
        required=False, min_value=0, max_value=64, label="Sample images",
        help_text="How many before/after samples to draw (default 8).",
    )
    dissection = forms.IntegerField(
        required=False, min_value=1, label="Dissection job",
        help_text="Which dissection ranks the units (default: the layer's latest).",
    )
    unit = forms.IntegerField(required=False, min_value=0, help_text="The unit number.")
    eps = forms.FloatField(required=False, min_value=0.0, max_value=1.0, help_text="L-inf budget in pixel scale (default 8/255).")
    iterations = forms.IntegerField(required=False, min_value=1, max_value=1000, help_text="PGD steps (default 20).")

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        models = selectors.model_list(user=user)
        self.fields["model"].queryset = models
        self.fields["dataset"].queryset = selectors.dataset_list(user=user)
        segmenters = models.filter(kind=NetworkModel.Kind.SEGMENTER).values_list("pk", "name")
        self.fields["concepts"].choices = [("colors", "colours (computed from the pixels)")] + [
            (str(pk), f"segmenter {name}") for pk, name in segmenters
        ]

    def clean_type(self):
        return self.cleaned_data["type"] or Job.Type.DISSECT

    def clean_ks(self):
        return _numbers(self.cleaned_data["ks"])

    def params(self) -> dict:
        """The params of the chosen type, from its fields only (empty fields: the service's defaults)."""
        data = self.cleaned_data
        params: dict = {}
        for name in _job_fields(data["type"], data["model"].kind):
            value = data.get(name)
            if value is None or value == "" or value == []:
                continue
            if name == "layers":
                value = [item for item in re.split(r"[,\s]+", value) if item]
            elif name == "concepts":
                value = "colors" if value == "colors" else int(value)
            elif isinstance(value, str):
                value = value.strip()
            params[PARAM_KEYS.get(name, name)] = value
        return params


def _add_service_error(form: forms.Form, exc: ApplicationError) -> None:
    form.add_error(None, exc.message)
    for key, value in (exc.extra or {}).items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        form.add_error(None, f"{key}: {value}")


def _job_form_spec(form: JobForm, user) -> dict:
    """What the form's script needs: each model's kind, layers and dissected concepts, and the fields of each type."""
    models = {}
    for m in form.fields["model"].queryset.select_related(None).only("id", "kind", "layers"):
        entry = {"kind": m.kind, "layers": [{"name": e["name"], "type": e.get("type", ""), "units": e.get("units")}
                                            for e in m.layers or []]}
        if m.kind == NetworkModel.Kind.GENERATOR:
            entry["dissected"] = {layer["name"]: [c["name"] for c in layer["concepts"]]
                                  for layer in dissected_layers(model=m, user=user)}
        models[str(m.pk)] = entry
    return {
        "models": models,
        "types": {t: JOB_FIELDS[t] for t, _ in JOB_TYPES},
        "fields": sorted({f for spec in JOB_FIELDS.values() for names in spec.values() for f in names}),
    }


@login_required
def job_new(request):
    user = request.user
    if request.method == "POST":
        form = JobForm(request.POST, user=user)
        if form.is_valid():
            data = form.cleaned_data
            try:
                job = services.job_create(
                    owner=user, type=data["type"], model=data["model"], dataset=data["dataset"],
                    params=form.params(),
                )
            except ApplicationError as exc:
                _add_service_error(form, exc)
            else:
                messages.success(request, f"Job {job.pk} submitted.")
                return redirect("dashboard-job", pk=job.pk)
    else:
        initial = {}
        if request.GET.get("model", "").isdigit():
            initial["model"] = int(request.GET["model"])
        if request.GET.get("type") in Job.Type.values:
            initial["type"] = request.GET["type"]
        for name in ("layer", "concept"):
            if request.GET.get(name):
                initial[name] = request.GET[name]
        form = JobForm(initial=initial, user=user)
    return render(request, "dashboard/job_new.html", {"form": form, "spec": _job_form_spec(form, user)})


# Models and datasets


@login_required
def models_page(request):
    rows = list(selectors.model_list(user=request.user).defer("mean", "std"))
    for model in rows:
        model.is_generator = model.kind == NetworkModel.Kind.GENERATOR
        model.layer_count = len(model.layers or [])
        model.unit_count = sum(entry.get("units") or 0 for entry in model.layers or [] if entry.get("type") == "Conv2d")
    return render(request, "dashboard/models.html", {"models": rows})


def _bar_chart(counts: list[tuple[str, str, int]], *, room: int = 900) -> dict:
    """Fig. 1d: one vertical bar per concept (units that detect it), grouped by category.

    Bars share ``room`` pixels (16 to 44 each; wider charts scroll), labels stand at 60 degrees below.
    """
    bars_in = sorted(counts, key=lambda row: (_category_key(row[1]), -row[2], row[0]))
    top = max((n for _, _, n in bars_in), default=1)
    step = max(16, min(44, room // max(1, len(bars_in))))
    width, height, left, base = round(step * 0.72), 150, 44, 18
    longest = max((len(name) for name, _, _ in bars_in), default=4)
    bars = []
    for i, (name, category, n) in enumerate(bars_in):
        h = max(1.0, height * n / top)
        x = left + 6 + i * step
        bars.append({"x": x, "y": round(base + height - h, 1), "h": round(h, 1), "w": width, "n": n, "name": name,
                     "category": category, "colour": category_colour(category), "cx": x + width / 2,
                     "ly": base + height + 8, "ny": round(base + height - h - 4, 1)})
    return {
        "bars": bars,
        "width": left + 6 + max(1, len(bars_in)) * step + 4,
        "height": base + height + 16 + round(min(longest, 24) * 5.6),
        "axis_y": base + height,
        "left": left,
        "mid_y": base + height / 2,
        "ticks": _ticks(top, base, height),
    }


def _ticks(top: int, base: float, height: float) -> list[dict]:
    """Gridlines at 0, the middle (when it is a whole number of units) and the top."""
    values = sorted({0, top} | ({top // 2} if top >= 4 else set()))
    return [{"value": v, "y": round(base + height - height * v / top, 1)} for v in values]


def _category_bars(counts: list[tuple[str, str, int]], *, unique: bool) -> list[dict]:
    """Detectors (or unique concepts) per category, as horizontal bars."""
    totals: dict[str, int] = {}
    for _, category, n in counts:
        totals[category] = totals.get(category, 0) + (1 if unique else n)
    top = max(totals.values(), default=1)
    return [{"name": c, "n": totals[c], "pct": round(100 * totals[c] / top), "colour": category_colour(c)}
            for c in sorted(totals, key=_category_key)]


def _layers_chart(columns: list[tuple[str, list[tuple[str, str, int]]]]) -> dict:
    """Fig. 1e: unique concepts per layer, stacked by category, layers in network order."""
    stacks = []
    categories: set[str] = set()
    for layer, counts in columns:
        per_cat: dict[str, int] = {}
        for _, category, _n in counts:
            per_cat[category] = per_cat.get(category, 0) + 1
        categories |= per_cat.keys()
        stacks.append((layer, per_cat))
    top = max((sum(p.values()) for _, p in stacks), default=1) or 1
    step = max(48, min(110, 800 // max(1, len(stacks))))
    width, height, left, base = round(step * 0.6), 180, 44, 20
    rotate = any(len(layer) * 6.5 > step for layer, _ in stacks)
    longest = max((len(layer) for layer, _ in stacks), default=4)
    out = []
    for i, (layer, per_cat) in enumerate(stacks):
        x = left + 12 + i * step
        y = base + height
        parts = []
        for category in sorted(per_cat, key=_category_key):
            h = height * per_cat[category] / top
            y -= h
            parts.append({"y": round(y, 1), "h": round(h, 1), "colour": category_colour(category),
                          "category": category, "n": per_cat[category]})
        out.append({"layer": layer, "x": x, "w": width, "cx": x + width / 2, "parts": parts,
                    "total": sum(per_cat.values()), "ty": round(y - 5, 1),
                    "ly": base + height + (8 if rotate else 16)})
    return {
        "stacks": out,
        "width": left + 12 + max(1, len(stacks)) * step,
        "height": base + height + (16 + round(min(longest, 30) * 4.2) if rotate else 26),
        "rotate": rotate,
        "axis_y": base + height,
        "left": left,
        "mid_y": base + height / 2,
        "ticks": _ticks(top, base, height),
        "legend": [{"name": c, "colour": category_colour(c)} for c in sorted(categories, key=_category_key)],
    }


@login_required
def model_page(request, pk: int):
    user = request.user
    model = get_object_or_404(selectors.model_list(user=user), pk=pk)
    latest = selectors.dashboard_latest_layer_results(model=model, user=user)
    order = [entry["name"] for entry in model.layers or []]
    dissected = sorted(latest.values(), key=lambda r: order.index(r.layer) if r.layer in order else len(order))
    counts = selectors.dashboard_detector_counts(layer_results=dissected)
    sections = []
    for result in dissected:
        rows = counts[(result.job_id, result.layer)]
        sections.append({
            "result": result,
            "detectors": sum(n for _, _, n in rows),
            "unique": len(rows),
            "chart": _bar_chart(rows),
            "categories": _category_bars(rows, unique=False),
            "legend": [{"name": c["name"], "colour": c["colour"]} for c in _category_bars(rows, unique=True)],
        })
    layers = []
    for entry in model.layers or []:
        result = latest.get(entry["name"])
        layers.append({**entry, "result": result})
    jobs = list(selectors.dashboard_model_jobs(model=model, user=user)[:20])
    describe_sources(user=user, jobs=jobs)
    labels = []
    if model.kind == NetworkModel.Kind.SEGMENTER:
        categories = model.categories or []
        labels = [{"index": i, "name": name, "category": categories[i] if i < len(categories) else "",
                   "colour": category_colour(categories[i]) if i < len(categories) else "#9ca3af"}
                  for i, name in enumerate(model.classes or [])]
    return render(request, "dashboard/model.html", {
        "model": model,
        "is_generator": model.kind == NetworkModel.Kind.GENERATOR,
        "labels": labels,
        "layers": layers,
        "sections": sections,
        "network_chart": _layers_chart([(r.layer, counts[(r.job_id, r.layer)]) for r in dissected]) if dissected else None,
        "jobs": jobs,
        "min_iou": selectors.DETECTOR_MIN_IOU,
        "is_owner": model.owner_id == user.pk,
    })


class ModelForm(forms.Form):
    name = forms.CharField(max_length=200)
    arch = forms.CharField(
        max_length=200, label="Architecture",
        help_text="torchvision:NAME (e.g. torchvision:resnet18), builtin:NAME (e.g. builtin:scenecnn) or torchscript.",
    )
    kind = forms.ChoiceField(choices=NetworkModel.Kind.choices, initial=NetworkModel.Kind.CLASSIFIER)
    num_classes = forms.IntegerField(
        required=False, min_value=1, max_value=100_000, label="Classes", help_text="Output classes of a classifier."
    )
    input_size = forms.IntegerField(
        required=False, min_value=8, max_value=4096, label="Input size", help_text="Image side in pixels; default 224."
    )
    weights = forms.FileField(
        required=False, help_text="Upload .safetensors, or a .pt/.pth state dict (TorchScript: .pt, .ts, .zip)."
    )
    weights_path = forms.CharField(
        required=False, max_length=1000, help_text="Or a file on the server, inside the configured data roots."
    )
    public = forms.BooleanField(required=False, help_text="Everyone logged in may see it and its units.")

    def clean_arch(self):
        arch = self.cleaned_data["arch"].strip()
        if arch != "torchscript" and not arch.startswith(("torchvision:", "builtin:")):
            raise forms.ValidationError("arch must be torchvision:NAME, builtin:NAME or torchscript")
        return arch

    def clean(self):
        data = super().clean()
        if bool(data.get("weights")) == bool((data.get("weights_path") or "").strip()):
            raise forms.ValidationError("Give exactly one of a weights file or a weights path.")
        return data


@login_required
def model_new(request):
    if request.method == "POST":
        form = ModelForm(request.POST, request.FILES)
        if form.is_valid():
            data = form.cleaned_data
            try:
                model = services.model_register(
                    owner=request.user, name=data["name"], arch=data["arch"], kind=data["kind"],
                    num_classes=data["num_classes"], input_size=data["input_size"],
                    weights_file=data["weights"] or None, weights_path=(data["weights_path"] or "").strip() or None,
                    public=data["public"],
                )
            except ApplicationError as exc:
                _add_service_error(form, exc)
            else:
                messages.success(request, f"Model {model.name} registered with {len(model.layers)} layers.")
                return redirect("dashboard-model", pk=model.pk)
    else:
        form = ModelForm()
    return render(request, "dashboard/form.html", {
        "form": form, "title": "Register a model", "submit": "Register model", "multipart": True,
        "intro": "The weights are loaded into the architecture in a separate process before the model is saved; "
                 "files are never unpickled with code.",
    })


@login_required
def datasets_page(request):
    return render(request, "dashboard/datasets.html", {"datasets": selectors.dataset_list(user=request.user)})


class DatasetForm(forms.Form):
    name = forms.CharField(max_length=200)
    format = forms.ChoiceField(
        choices=Dataset.Format.choices,
        help_text="broden: a Broden directory (index.csv, label.csv, images/); imagefolder: class folders "
                  "of images; synthetic: the demo scenes.",
    )
    path = forms.CharField(required=False, max_length=1000, help_text="A directory on the server, inside the data roots.")
    archive = forms.FileField(required=False, help_text="Or upload a .zip or .tar(.gz) of the directory.")
    concepts = forms.ChoiceField(
        choices=[("masks", "masks (from the dataset's annotations)"), ("colors", "colors (computed from pixels)")],
        initial="masks",
    )
    public = forms.BooleanField(required=False, help_text="Everyone logged in may use it.")

    def clean(self):
        data = super().clean()
        if bool(data.get("archive")) == bool((data.get("path") or "").strip()):
            raise forms.ValidationError("Give exactly one of a path or an archive.")
        return data


@login_required
def dataset_new(request):
    if request.method == "POST":
        form = DatasetForm(request.POST, request.FILES)
        if form.is_valid():
            data = form.cleaned_data
            try:
                dataset = services.dataset_register(
                    owner=request.user, name=data["name"], format=data["format"],
                    path=(data["path"] or "").strip() or None, archive=data["archive"] or None,
                    concepts=data["concepts"], public=data["public"],
                )
            except ApplicationError as exc:
                _add_service_error(form, exc)
            else:
                messages.success(
                    request, f"Dataset {dataset.name} registered: {dataset.image_count} images, "
                             f"{dataset.concept_count} concepts.")
                return redirect("dashboard-datasets")
    else:
        form = DatasetForm()
    return render(request, "dashboard/form.html", {
        "form": form, "title": "Register a dataset", "submit": "Register dataset", "multipart": True,
        "intro": "The dataset is opened and checked (images, masks, concepts) before it is saved.",
    })


# Units


def _decorate_unit(unit):
    unit.colour = category_colour(unit.label.category) if unit.label_id else "#9ca3af"
    unit.strip_ratio = max(1, len(unit.top_images or []))
    unit.detector = unit.iou >= selectors.DETECTOR_MIN_IOU
    return unit


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
    sort = request.GET.get("sort", "-iou")
    if sort not in selectors.DASHBOARD_UNIT_ORDERINGS:
        sort = "-iou"
    units = selectors.dashboard_layer_units(
        user=user, job=job, layer=layer, concept=concept, category=category, min_iou=min_iou, ordering=sort
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
    return render(request, "dashboard/units.html", {
        "job": job,
        "layer": layer,
        "result": result,
        "page": page,
        "links": _page_links(request, page),
        "concepts": sorted(concept_counts.items()),
        "categories": [(c, categories[c]) for c in sorted(categories, key=_category_key)],
        "sorts": SORTS,
        "selected": {"concept": concept, "category": category, "min_iou": "" if min_iou is None else min_iou,
                     "sort": sort},
        "filtered": bool(concept or category or min_iou is not None),
        "detector_iou": selectors.DETECTOR_MIN_IOU,
    })


@login_required
def unit_page(request, pk: int):
    user = request.user
    unit = _decorate_unit(get_object_or_404(selectors.unit_list(user=user), pk=pk))
    scores = selectors.unit_top_concepts(unit_ids=[unit.pk])[unit.pk]
    top = max((s["iou"] for s in scores), default=0.0) or 1.0
    for score in scores:
        score["colour"] = category_colour(score["category"])
        score["pct"] = round(100 * score["iou"] / top, 1) if top > 0 else 0
    return render(request, "dashboard/unit.html", {
        "unit": unit,
        "scores": scores,
        "neighbours": selectors.dashboard_unit_neighbours(user=user, unit=unit),
        "detector_iou": selectors.DETECTOR_MIN_IOU,
        "generated": unit.model.kind == NetworkModel.Kind.GENERATOR,
    })


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
        suggestion.colour = category_colour(suggestion.category)
    return render(request, "dashboard/search.html", {
        "concept": concept,
        "min_iou": "" if min_iou is None else min_iou,
        "page": page,
        "links": links,
        "suggestions": suggestions,
        "detector_iou": selectors.DETECTOR_MIN_IOU,
    })


@login_required
def token_page(request):
    return render(request, "dashboard/token.html", {"token": services.token_get_or_create(user=request.user)})

"""Job pages: the live list, a job, cancel, re-run, and the new-job form."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from api import selectors, services
from api.dashboard.common import JOBS_SHOWN, _add_service_error, _category_key, _decorate_job, category_colour
from api.dashboard.forms import JOB_TYPES, JobForm, job_form_layout
from api.dashboard.generators import describe_sources, dissected_layers, generator_context
from api.dashboard.roles import ablation_context, unit_classifier_context
from api.errors import ApplicationError
from api.models import Job, NetworkModel


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
    filters = [
        ("", "all", sum(counts.values())),
        ("active", "active", counts.get("queued", 0) + counts.get("running", 0)),
    ]
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
            layers.append(
                {
                    "name": row.layer,
                    "units": row.units,
                    "detectors": summary.get("detectors", 0),
                    "unique": summary.get("unique_concepts", 0),
                    "min_iou": summary.get("min_iou", selectors.DETECTOR_MIN_IOU),
                    "categories": [
                        {
                            "name": c,
                            "detectors": by_category[c],
                            "unique": unique.get(c, 0),
                            "colour": category_colour(c),
                        }
                        for c in sorted(by_category, key=_category_key)
                    ],
                    "top": top,
                }
            )
    params = [
        (key, ", ".join(map(str, value)) if isinstance(value, list) else value)
        for key, value in sorted(job.params.items())
    ]
    roles = {}
    if job.status == Job.Status.SUCCEEDED and job.type == Job.Type.ABLATE:
        roles = ablation_context(job, request.GET.get("class"))
    return render(
        request,
        "dashboard/job.html",
        {
            "job": job,
            "params": params,
            "layers": layers,
            "roles": roles,
            "attack": job.summary if job.status == Job.Status.SUCCEEDED and job.type == Job.Type.ATTACK else None,
            "unit_classifier": unit_classifier_context(job.summary)
            if job.status == Job.Status.SUCCEEDED and job.type == Job.Type.UNIT_CLASSIFIER
            else None,
            "generator": generator_context(job, user=request.user),
            "can_cancel": job.owner_id == request.user.pk and not job.is_final,
        },
    )


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


def _job_form_spec(form: JobForm, user) -> dict:
    """What the form's script needs: each model's kind, layers and dissected concepts, and the fields of each type."""
    layout = job_form_layout()
    models = {}
    for m in form.fields["model"].queryset.select_related(None).only("id", "kind", "layers"):
        entry = {
            "kind": m.kind,
            "layers": [{"name": e["name"], "type": e.get("type", ""), "units": e.get("units")} for e in m.layers or []],
        }
        if m.kind == NetworkModel.Kind.GENERATOR:
            entry["dissected"] = {
                layer["name"]: [c["name"] for c in layer["concepts"]] for layer in dissected_layers(model=m, user=user)
            }
        models[str(m.pk)] = entry
    return {
        "models": models,
        "types": {t: layout[t] for t, _ in JOB_TYPES},
        "fields": sorted({f for spec in layout.values() for names in spec.values() for f in names}),
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
                    owner=user,
                    type=data["type"],
                    model=data["model"],
                    dataset=data["dataset"],
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
        if request.GET.getlist("layers"):  # ticked on the model page
            initial["layers"] = ", ".join(request.GET.getlist("layers"))
        form = JobForm(initial=initial, user=user)
    return render(request, "dashboard/job_new.html", {"form": form, "spec": _job_form_spec(form, user)})

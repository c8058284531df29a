"""Server-rendered dashboard pages (behind login). Reads go through api.selectors."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, render
from rest_framework.authtoken.models import Token

from api import selectors


@login_required
def jobs_page(request):
    jobs = selectors.job_list(user=request.user)[:100]
    return render(request, "dashboard/jobs.html", {"jobs": jobs})


@login_required
def job_page(request, pk: int):
    job = get_object_or_404(selectors.job_list(user=request.user), pk=pk)
    layers = job.layer_results.all() if job.status == "succeeded" else []
    units = selectors.unit_list(user=request.user).filter(job=job)[:500]
    return render(request, "dashboard/job.html", {"job": job, "layers": layers, "units": units})


@login_required
def token_page(request):
    token, _ = Token.objects.get_or_create(user=request.user)
    return render(request, "dashboard/token.html", {"token": token.key})

"""Server-rendered dashboard pages (behind login), one module per concern.

Reads go through api.selectors, writes through api.services; a service's ApplicationError is
shown on the form that caused it. Charts are SVG drawn by the templates from the geometry
computed here (no JavaScript, nothing fetched).

- ``jobs``: the job list, a job, cancel, re-run, new job; ``forms``: the forms (the job form is
  built from ``api.job_params``);
- ``catalog``: models, datasets, the token; ``charts``: Figure 1d/1e geometry;
- ``units``: a layer's gallery, a unit, the concept search;
- ``roles`` and ``generators``: the pages of ablation, attack, unit classifier, removal,
  insertion and painting jobs; ``common``: what they share.
"""

from api.dashboard.catalog import dataset_new, datasets_page, model_new, model_page, models_page, token_page
from api.dashboard.common import category_colour
from api.dashboard.forms import DatasetForm, JobForm, ModelForm
from api.dashboard.generators import paint_page
from api.dashboard.jobs import job_cancel, job_new, job_page, job_rerun, jobs_live_fragment, jobs_page
from api.dashboard.units import layer_units_page, search_page, unit_page

__all__ = [
    "DatasetForm",
    "JobForm",
    "ModelForm",
    "category_colour",
    "dataset_new",
    "datasets_page",
    "job_cancel",
    "job_new",
    "job_page",
    "job_rerun",
    "jobs_live_fragment",
    "jobs_page",
    "layer_units_page",
    "model_new",
    "model_page",
    "models_page",
    "paint_page",
    "search_page",
    "token_page",
    "unit_page",
]

from django.contrib.auth import views as auth_views
from django.urls import path

from api import dashboard

urlpatterns = [
    path("", dashboard.jobs_page, name="dashboard-jobs"),
    path("jobs/live/", dashboard.jobs_live_fragment, name="dashboard-jobs-live"),
    path("jobs/new/", dashboard.job_new, name="dashboard-job-new"),
    path("jobs/<int:pk>/", dashboard.job_page, name="dashboard-job"),
    path("jobs/<int:pk>/cancel/", dashboard.job_cancel, name="dashboard-job-cancel"),
    path("jobs/<int:pk>/rerun/", dashboard.job_rerun, name="dashboard-job-rerun"),
    path("jobs/<int:pk>/layers/<str:layer>/", dashboard.layer_units_page, name="dashboard-layer-units"),
    path("models/", dashboard.models_page, name="dashboard-models"),
    path("models/new/", dashboard.model_new, name="dashboard-model-new"),
    path("models/<int:pk>/", dashboard.model_page, name="dashboard-model"),
    path("models/<int:pk>/paint/", dashboard.paint_page, name="dashboard-paint"),
    path("datasets/", dashboard.datasets_page, name="dashboard-datasets"),
    path("datasets/new/", dashboard.dataset_new, name="dashboard-dataset-new"),
    path("units/<int:pk>/", dashboard.unit_page, name="dashboard-unit"),
    path("search/", dashboard.search_page, name="dashboard-search"),
    path("token/", dashboard.token_page, name="dashboard-token"),
    path("login/", auth_views.LoginView.as_view(template_name="dashboard/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]

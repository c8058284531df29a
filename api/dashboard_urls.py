from django.contrib.auth import views as auth_views
from django.urls import path

from api import dashboard

urlpatterns = [
    path("", dashboard.jobs_page, name="dashboard-jobs"),
    path("jobs/<int:pk>/", dashboard.job_page, name="dashboard-job"),
    path("token/", dashboard.token_page, name="dashboard-token"),
    path("login/", auth_views.LoginView.as_view(template_name="dashboard/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]

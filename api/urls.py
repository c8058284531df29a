from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from api import views

router = DefaultRouter()
router.register("models", views.NetworkModelViewSet, basename="model")
router.register("datasets", views.DatasetViewSet, basename="dataset")
router.register("jobs", views.JobViewSet, basename="job")
router.register("units", views.UnitViewSet, basename="unit")
router.register("concepts", views.ConceptViewSet, basename="concept")

urlpatterns = [
    path("health/", views.HealthView.as_view(), name="health"),
    path("webhook-secret/", views.WebhookSecretView.as_view(), name="webhook-secret"),
    path("schema/", SpectacularAPIView.as_view(permission_classes=[]), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[]), name="docs"),
    # The unit list ahead of the router (the same view for what the lean path does not answer):
    # one pattern tried instead of ~28, and no DRF dispatch for a plain read (api.views.unit_list).
    path("units/", views.unit_list, name="unit-list"),
    path("", include(router.urls)),
]

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
    path("", include(router.urls)),
]

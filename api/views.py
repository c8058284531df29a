"""HTTP endpoints. Views parse input, call one service or selector, and serialize the result."""

from __future__ import annotations

import math

from django.http import FileResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.filters import OrderingFilter
from rest_framework.generics import get_object_or_404
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from api import selectors, services, unit_page
from api.errors import ApplicationError
from api.filters import ConceptFilter, JobFilter, UnitFilter
from api.models import Concept, Dataset, Job, NetworkModel, Unit
from api.pagination import LimitOffsetPagination, UnitPagination
from api.parsers import JSONParser
from api.serializers import (
    JOB_CREATE_REQUEST,
    AblationSerializer,
    ConceptSerializer,
    DatasetCreateSerializer,
    DatasetSerializer,
    HealthSerializer,
    ImportantUnitsSerializer,
    JobCreateSerializer,
    JobSerializer,
    ModelLayerSerializer,
    NetworkModelCreateSerializer,
    NetworkModelSerializer,
    PaintResultSerializer,
    PaintSerializer,
    UnitDetailSerializer,
    UnitSerializer,
    WebhookSecretSerializer,
)
from api.services import idempotency


def _text_param(request, name: str, default: str | None = None) -> str | None:
    """A text query parameter; NUL characters (Postgres cannot compare them) are bad input."""
    value = request.query_params.get(name, default)
    if value is not None and "\x00" in value:
        raise ApplicationError(f"{name} must not contain NUL characters")
    return value


class HealthView(APIView):
    permission_classes = [AllowAny]
    authentication_classes = []

    @extend_schema(responses={200: HealthSerializer, 503: HealthSerializer})
    def get(self, request):
        ok, report = selectors.health()
        return Response(report, status=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE)


IDEMPOTENCY_PARAMETER = OpenApiParameter(
    idempotency.HEADER,
    str,
    OpenApiParameter.HEADER,
    description=(
        "Any unique string (1 to 255 visible ASCII characters): a retry with the same key and body answers "
        "the first response again (header Idempotent-Replayed: true) instead of creating a second object; "
        "the same key with another body is a 422. Keys live 24 h, per user."
    ),
)


def _idempotent(request, scope: str, create) -> Response:
    """Run a create once per Idempotency-Key (see api.services.idempotency)."""
    code, body, replayed = idempotency.idempotent_create(
        owner=request.user,
        scope=scope,
        key=idempotency.key_check(request.headers.get(idempotency.HEADER)),
        data=request.data,
        create=create,
    )
    response = Response(body, status=code)
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response


class WebhookSecretView(APIView):
    """Your webhook signing secret (GET), or a new one (POST; the old one stops verifying)."""

    @extend_schema(request=None, responses={200: WebhookSecretSerializer})
    def get(self, request):
        return Response({"secret": services.secret_of(request.user)})

    @extend_schema(request=None, responses={200: WebhookSecretSerializer})
    def post(self, request):
        return Response({"secret": services.secret_rotate(request.user)})


class NetworkModelViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = NetworkModel.objects.none()  # schema introspection only; get_queryset() scopes the rows to the user
    serializer_class = NetworkModelSerializer
    parser_classes = [MultiPartParser, FormParser, JSONParser]
    ordering_fields = ["created", "name"]

    def get_queryset(self):
        return selectors.model_list(user=self.request.user)

    @extend_schema(
        request=NetworkModelCreateSerializer,
        responses={201: NetworkModelSerializer},
        parameters=[IDEMPOTENCY_PARAMETER],
    )
    def create(self, request):
        def create():
            data = NetworkModelCreateSerializer(data=request.data)
            data.is_valid(raise_exception=True)
            values = dict(data.validated_data)
            model = services.model_register(
                owner=request.user,
                weights_file=values.pop("weights", None),
                weights_path=values.pop("weights_path", None),
                **values,
            )
            return status.HTTP_201_CREATED, NetworkModelSerializer(model).data

        return _idempotent(request, "models", create)

    @extend_schema(responses={200: ModelLayerSerializer(many=True)})
    @action(detail=True, methods=["get"], pagination_class=None)
    def layers(self, request, pk=None):
        """Every dissectable layer in execution order, its shape and layout, and its latest dissection."""
        model = self.get_object()
        rows = selectors.model_layer_rows(model=model, user=request.user)
        return Response(ModelLayerSerializer(rows, many=True).data)

    @extend_schema(
        request=PaintSerializer,
        parameters=[
            OpenApiParameter(
                "as",
                str,
                enum=["png", "json"],
                description="png (default): the edited image; json: both images, base64",
            )
        ],
        responses={
            (200, "image/png"): OpenApiTypes.BINARY,
            (200, "application/json"): PaintResultSerializer,
            503: OpenApiResponse(description="no worker answered in time"),
        },
    )
    @action(detail=True, methods=["post"])
    def paint(self, request, pk=None):
        """Add or erase a concept inside a mask of one generated image (the paper's Figure 6)."""
        import base64

        from django.http import HttpResponse

        model = self.get_object()
        data = PaintSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        kind = request.query_params.get("as", "png")
        if kind not in ("png", "json"):
            raise ApplicationError("as must be png or json")
        out = services.generator_paint(user=request.user, model=model, **data.validated_data)
        if kind == "png":
            response = HttpResponse(out["after"], content_type="image/png")
            response["X-Units"] = ",".join(map(str, out["units"]))
            response["X-Worker-Milliseconds"] = str(out["milliseconds"])
            return response
        payload = {
            **out,
            "before": base64.b64encode(out["before"]).decode(),
            "after": base64.b64encode(out["after"]).decode(),
        }
        return Response(PaintResultSerializer(payload).data)

    @extend_schema(
        parameters=[
            OpenApiParameter("class_name", str, OpenApiParameter.PATH, description="a class of the ablate job"),
            OpenApiParameter("layer", str, description="the ablated layer (default: the latest ablate job's)"),
            OpenApiParameter("limit", int, description="how many units (default 20)"),
        ],
        responses={200: ImportantUnitsSerializer},
    )
    @action(detail=True, methods=["get"], url_path=r"classes/(?P<class_name>[^/]+)/important-units")
    def important_units(self, request, pk=None, class_name=None):
        """A class's most important units (removing each alone hurts the class most), from the latest ablate job."""
        model = self.get_object()
        job = selectors.latest_ablation_job(model=model, user=request.user, layer=_text_param(request, "layer"))
        if job is None:
            raise ApplicationError(f"model {model.name} has no succeeded ablate job", status=404)
        if class_name not in job.summary.get("classes", []):
            raise ApplicationError(
                f"{class_name!r} is not a class of ablate job {job.pk}",
                status=404,
                extra={"classes": job.summary.get("classes", [])},
            )
        try:
            limit = max(1, min(10_000, int(request.query_params.get("limit", 20))))
        except ValueError:
            raise ApplicationError("limit must be an integer") from None
        rows = selectors.important_units(job=job, class_name=class_name, limit=limit)
        return Response(
            ImportantUnitsSerializer(
                {"job": job.pk, "layer": job.params["layer"], "class_name": class_name, "units": rows}
            ).data
        )


class DatasetViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Dataset.objects.none()  # schema introspection only; get_queryset() scopes the rows to the user
    serializer_class = DatasetSerializer
    parser_classes = [JSONParser, MultiPartParser, FormParser]
    ordering_fields = ["created", "name"]

    def get_queryset(self):
        return selectors.dataset_list(user=self.request.user)

    @extend_schema(
        request=DatasetCreateSerializer, responses={201: DatasetSerializer}, parameters=[IDEMPOTENCY_PARAMETER]
    )
    def create(self, request):
        def create():
            data = DatasetCreateSerializer(data=request.data)
            data.is_valid(raise_exception=True)
            dataset = services.dataset_register(owner=request.user, **dict(data.validated_data))
            return status.HTTP_201_CREATED, DatasetSerializer(dataset).data

        return _idempotent(request, "datasets", create)


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Job.objects.none()  # schema introspection only; get_queryset() scopes the rows to the user
    serializer_class = JobSerializer
    filterset_class = JobFilter
    ordering_fields = ["created"]

    def get_queryset(self):
        return selectors.job_list(user=self.request.user)

    @extend_schema(request=JOB_CREATE_REQUEST, responses={202: JobSerializer}, parameters=[IDEMPOTENCY_PARAMETER])
    def create(self, request):
        def create():
            data = JobCreateSerializer(data=request.data)
            data.is_valid(raise_exception=True)
            values = data.validated_data
            model = get_object_or_404(selectors.model_list(user=request.user), pk=values["model"])
            dataset = None
            if values.get("dataset") is not None:
                dataset = get_object_or_404(selectors.dataset_list(user=request.user), pk=values["dataset"])
            job = services.job_create(
                owner=request.user,
                type=values["type"],
                model=model,
                dataset=dataset,
                params=values["params"],
                callback_url=values.get("callback_url", ""),
                callback_progress=values.get("callback_progress"),
            )
            return status.HTTP_202_ACCEPTED, JobSerializer(job).data

        return _idempotent(request, "jobs", create)

    @extend_schema(request=None, responses={200: JobSerializer, 409: OpenApiResponse(description="already final")})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = get_object_or_404(self.get_queryset().filter(owner=request.user), pk=pk)
        job = services.job_cancel(job=job)
        return Response(JobSerializer(job).data)

    @extend_schema(
        parameters=[
            OpenApiParameter("layer", str, required=True, description="a dissected layer of the job"),
            OpenApiParameter("as", str, enum=["csv", "npz"], description="csv (default) or npz"),
            OpenApiParameter(
                "intervals",
                bool,
                description=(
                    "csv: add iou_low and iou_high, each IoU's 95% interval (delete-one-block jackknife); the npz "
                    "holds them as arrays iou_low and iou_high when the job computed them"
                ),
            ),
        ],
        responses={(200, "text/csv"): OpenApiTypes.BINARY, (200, "application/octet-stream"): OpenApiTypes.BINARY},
    )
    @action(detail=True, methods=["get"])
    def matrix(self, request, pk=None):
        """The full unit x concept IoU matrix of one layer of a succeeded job."""
        job = self.get_object()
        layer = _text_param(request, "layer", "")
        kind = request.query_params.get("as", "csv")
        if kind not in ("csv", "npz"):
            raise ApplicationError("as must be csv or npz")
        path = selectors.job_matrix_path(job=job, layer=layer)
        if kind == "npz":
            return FileResponse(open(path, "rb"), as_attachment=True, filename=f"job{job.pk}-{layer}.npz")
        intervals = request.query_params.get("intervals", "false").lower()
        if intervals not in ("true", "false", "1", "0"):
            raise ApplicationError(f"intervals must be true or false, not {intervals!r}")
        response = StreamingHttpResponse(
            selectors.matrix_csv_lines(path, intervals=intervals in ("true", "1")), content_type="text/csv"
        )
        response["Content-Disposition"] = f'attachment; filename="job{job.pk}-{layer}.csv"'
        return response

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "name",
                str,
                OpenApiParameter.PATH,
                pattern=r"^[a-z0-9-]+$",
                description="an image name from the job summary's images",
            )
        ],
        responses={(200, "image/png"): OpenApiTypes.BINARY, 404: OpenApiResponse(description="no image")},
    )
    @action(detail=True, methods=["get"], url_path=r"images/(?P<name>[a-z0-9-]+)")
    def images(self, request, pk=None, name=None):
        """A picture a generator job made (its summary's ``images`` names them): before/after sample grids."""
        job = self.get_object()
        return FileResponse(open(selectors.job_image_path(job=job, name=name), "rb"), content_type="image/png")

    @extend_schema(responses={200: AblationSerializer, 409: OpenApiResponse(description="not a succeeded ablate job")})
    @action(detail=True, methods=["get"])
    def ablation(self, request, pk=None):
        """An ablate job's results: baselines, ties, the curves of Figure 2c and the Figure 2e scatter."""
        job = self.get_object()
        if job.type != "ablate" or job.status != "succeeded":
            raise ApplicationError(f"job {job.pk} is not a succeeded ablate job", status=409)
        return Response(AblationSerializer({"job": job.pk, "summary": job.summary, "curves": job.curves.all()}).data)


class UnitViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Unit.objects.none()  # schema introspection only; get_queryset() scopes the rows to the user
    filterset_class = UnitFilter
    pagination_class = UnitPagination
    ordering_fields = ["iou", "id"]

    def get_queryset(self):
        return selectors.unit_list(user=self.request.user)

    def list(self, request, *args, **kwargs):
        if unit_page.applies(request, self):
            return unit_page.list_response(request, self)
        return super().list(request, *args, **kwargs)

    def get_serializer_class(self):
        return UnitDetailSerializer if self.action == "retrieve" else UnitSerializer

    @extend_schema(responses={(200, "image/png"): OpenApiTypes.BINARY, 404: OpenApiResponse(description="no image")})
    @action(detail=True, methods=["get"])
    def image(self, request, pk=None):
        """The unit's top-activating images, the region above its threshold highlighted (PNG)."""
        unit = self.get_object()
        path = selectors.unit_image_path(unit=unit)
        if path is None:
            raise ApplicationError(f"unit {unit.pk} has no image", status=404)
        return FileResponse(open(path, "rb"), content_type="image/png")


_unit_list = UnitViewSet.as_view({"get": "list"})


@csrf_exempt  # as DRF's views are: the viewset checks CSRF itself, for session users
def unit_list(request, *args, **kwargs):
    """``/api/units/``, routed ahead of the router's pattern (api/urls.py): a plain JSON read with
    a valid token is answered by :func:`api.unit_page.lean_response` without DRF's dispatch
    (in process, a fifth of the Python time outside the two statements: 1.41 -> 1.13 ms per
    request under cProfile, docs/benchmarks.md); everything else by the viewset's list."""
    response = unit_page.lean_response(request)
    return _unit_list(request, *args, **kwargs) if response is None else response


class ConceptPagination(LimitOffsetPagination):
    """Counts the page query's own rows: ordering concepts by their unit counts aggregates every
    visible concept anyway (one row per concept), so one aggregate serves the count and the
    page, rather than a second aggregate for COUNT(*)."""

    def get_count(self, queryset) -> int:
        return len(queryset)


class ConceptViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    queryset = Concept.objects.all()  # the catalogue, filtered by ConceptFilter; list() counts the user's units
    serializer_class = ConceptSerializer
    filterset_class = ConceptFilter
    pagination_class = ConceptPagination
    ordering_fields = ["units", "models", "name"]

    @extend_schema(
        description=(
            "Concepts that label at least one visible unit of a succeeded job, with the number of such "
            "units, of models, and the best IoU. The counts are sums of summary rows per visibility scope "
            "(the public models, your own jobs on other models) refreshed when a job succeeds: detector "
            "counts at the default min_iou (0.04), at any other (Postgres) the units above the IoU cell that "
            "holds it plus that cell's units at or above it. "
            "Other min_stability or max_p_value values count the units themselves (seconds over millions "
            "of units)."
        ),
        parameters=[
            OpenApiParameter("min_iou", float, description="count units with IoU >= this (default 0.04)"),
            OpenApiParameter("min_stability", float, description="count only labels with stability >= this (0 to 1)"),
            OpenApiParameter("max_p_value", float, description="count only labels with p_value <= this (0 to 1)"),
        ],
    )
    def list(self, request, *args, **kwargs):
        params = request.query_params
        # The filters choose concepts and the ordering is checked as DRF does; the selector counts
        # and orders (plain rows: the count reads every visible concept, ~1,200).
        concepts = DjangoFilterBackend().filter_queryset(request, self.get_queryset(), self)
        rows = selectors.concept_list(
            user=request.user,
            min_iou=_number_param(params, "min_iou", selectors.DETECTOR_MIN_IOU),
            min_stability=_number_param(params, "min_stability", None, low=0.0, high=1.0),
            max_p_value=_number_param(params, "max_p_value", None, low=0.0, high=1.0),
            concepts=concepts,
            ordering=OrderingFilter().get_ordering(request, concepts, self) or (),
        )
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)


def _number_param(params, name: str, default, *, low: float | None = None, high: float | None = None):
    """A finite number query parameter (``default`` when absent), in [low, high] when given."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApplicationError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" from {low} to {high}" if low is not None and high is not None else ""
        raise ApplicationError(f"{name} must be a finite number{bounds}, not {raw!r}")
    return value

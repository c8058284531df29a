"""Input and output serializers. Fields are listed explicitly everywhere."""

from __future__ import annotations

from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema_field
from rest_framework import serializers

from api import selectors
from api.job_params import PARAMS, params_serializer
from api.models import (
    LAYER_KINDS,
    AblationCurve,
    Concept,
    Dataset,
    Job,
    LayerResult,
    NetworkModel,
    Unit,
    UnitConcept,
    WebhookDelivery,
    arch_spec_problem,
)


class LayerInfoSerializer(serializers.Serializer):
    name = serializers.CharField()
    type = serializers.CharField()
    units = serializers.IntegerField()
    height = serializers.IntegerField()
    width = serializers.IntegerField()
    kind = serializers.ChoiceField(
        choices=LAYER_KINDS,
        default="map",
        help_text="how the output is laid out as unit maps: [B, C, H, W], [B, H, W, C], transformer tokens "
        "[B, N, C] on the patch grid, or a vector [B, C] (1 x 1 maps)",
    )
    prefix = serializers.ListField(
        child=serializers.CharField(), default=list, help_text="tokens: the prefix tokens left out of the map"
    )
    element = serializers.IntegerField(
        allow_null=True, default=None, help_text="for a layer that outputs a tuple: the element laid out"
    )


class NetworkModelSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    layers = LayerInfoSerializer(many=True, read_only=True)

    class Meta:
        model = NetworkModel
        fields = [
            "id",
            "name",
            "arch",
            "kind",
            "num_classes",
            "input_size",
            "mean",
            "std",
            "classes",
            "categories",
            "latent_dim",
            "output_range",
            "layers",
            "public",
            "owner",
            "created",
        ]
        read_only_fields = fields


class NetworkModelCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    arch = serializers.CharField(max_length=200)
    kind = serializers.ChoiceField(choices=NetworkModel.Kind.choices, default=NetworkModel.Kind.CLASSIFIER)
    num_classes = serializers.IntegerField(required=False, min_value=1, max_value=100_000)
    input_size = serializers.IntegerField(required=False, min_value=8, max_value=4096)
    mean = serializers.ListField(child=serializers.FloatField(), min_length=3, max_length=3, required=False)
    std = serializers.ListField(
        child=serializers.FloatField(min_value=1e-6), min_length=3, max_length=3, required=False
    )
    classes = serializers.ListField(
        child=serializers.CharField(max_length=200),
        required=False,
        max_length=100_000,
        help_text="class names; for a segmenter its per-pixel labels, index 0 the background",
    )
    categories = serializers.ListField(
        child=serializers.CharField(max_length=100),
        required=False,
        max_length=100_000,
        help_text="segmenters: the concept category of every label (or one for all; default object)",
    )
    latent_dim = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=100_000,
        help_text="generators: latent size (inferred from built-in weights; required for TorchScript)",
    )
    output_range = serializers.ListField(
        child=serializers.FloatField(),
        min_length=2,
        max_length=2,
        required=False,
        help_text="generators: the value range of the output images (default [-1, 1])",
    )
    weights = serializers.FileField(required=False)
    weights_path = serializers.CharField(required=False, max_length=1000)
    public = serializers.BooleanField(default=False)

    def validate_arch(self, value: str) -> str:
        problem = arch_spec_problem(value)
        if problem:
            raise serializers.ValidationError(problem)
        return value


class DatasetSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    concepts = serializers.CharField(source="concepts_source", read_only=True)

    class Meta:
        model = Dataset
        fields = [
            "id",
            "name",
            "format",
            "path",
            "concepts",
            "image_count",
            "image_size",
            "mask_size",
            "categories",
            "concept_count",
            "classes",
            "public",
            "owner",
            "created",
        ]
        read_only_fields = fields


class DatasetCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    format = serializers.ChoiceField(choices=Dataset.Format.choices)
    path = serializers.CharField(required=False, max_length=1000)
    archive = serializers.FileField(required=False)
    concepts = serializers.ChoiceField(choices=["masks", "colors"], default="masks")
    public = serializers.BooleanField(default=False)


class WebhookSecretSerializer(serializers.Serializer):
    secret = serializers.CharField(help_text="the key of the HMAC-SHA256 signature of your jobs' webhooks")


class WebhookDeliverySerializer(serializers.ModelSerializer):
    delivery = serializers.UUIDField(source="delivery_id", read_only=True)

    class Meta:
        model = WebhookDelivery
        fields = ["delivery", "event", "attempts", "status_code", "error", "delivered", "created", "last_attempt"]
        read_only_fields = fields


class JobSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    model_name = serializers.CharField(source="model.name", read_only=True)
    dataset_name = serializers.CharField(source="dataset.name", read_only=True, default=None, allow_null=True)

    class Meta:
        model = Job
        fields = [
            "id",
            "type",
            "model",
            "model_name",
            "dataset",
            "dataset_name",
            "params",
            "status",
            "phase",
            "progress",
            "images_done",
            "images_total",
            "eta_seconds",
            "error",
            "attempts",
            "owner",
            "created",
            "started",
            "finished",
            "summary",
            "callback_url",
            "callback_progress",
            "deliveries",
        ]
        read_only_fields = fields

    deliveries = serializers.SerializerMethodField(help_text="webhook deliveries of the job, oldest first")

    @extend_schema_field(WebhookDeliverySerializer(many=True))
    def get_deliveries(self, job: Job) -> list[dict]:
        if not job.callback_url:
            return []
        return WebhookDeliverySerializer(job.deliveries.all(), many=True).data

    def to_representation(self, job: Job) -> dict:
        data = super().to_representation(job)
        request = self.context.get("request")
        if request is not None and request.user.pk != job.owner_id:  # a public job of someone else
            data["callback_url"], data["callback_progress"], data["deliveries"] = "", None, []
        return data


class JobCreateSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=Job.Type.choices)
    model = serializers.IntegerField(min_value=1)
    dataset = serializers.IntegerField(
        min_value=1,
        required=False,
        allow_null=True,
        help_text="required for classifier jobs; generator jobs generate their images (leave it out)",
    )
    params = serializers.DictField(
        required=False,
        default=dict,
        help_text="the job type's parameters (see the schema of each type); checked by the service",
    )
    callback_url = serializers.CharField(
        required=False,
        default="",
        allow_blank=True,
        max_length=2000,
        help_text="POST the job resource here when it ends, signed (docs/api.md, Webhooks)",
    )
    callback_progress = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        min_value=1,
        max_value=99,
        help_text="also POST it every this many percent of progress",
    )


def _job_create_variant(job_type: str) -> type[serializers.Serializer]:
    """The request of one job type, for the schema: ``type`` fixed, ``params`` typed."""
    classes = [cls for cls in PARAMS if cls.type == job_type]
    name = "".join(part.title() for part in job_type.split("_"))
    if len(classes) == 1:
        params = params_serializer(classes[0])(required=False)
    else:
        params = PolymorphicProxySerializer(
            component_name=f"{name}ParamsByKind",
            serializers=[params_serializer(c) for c in classes],
            resource_type_field_name=None,
            required=False,
            help_text="; ".join(f"{c.__name__}: {c.__doc__}" for c in classes),
        )
    return type(
        f"JobCreate{name}Serializer",
        (JobCreateSerializer,),
        {
            "__module__": __name__,
            "__doc__": f"A {job_type} job.",
            "type": serializers.ChoiceField(choices=[job_type]),
            "params": params,
        },
    )


JOB_CREATE_REQUEST = PolymorphicProxySerializer(
    component_name="JobCreate",
    serializers={job_type: _job_create_variant(job_type) for job_type in Job.Type.values},
    resource_type_field_name="type",
)


class UnitConceptSerializer(serializers.ModelSerializer):
    concept = serializers.CharField(source="concept.name")
    category = serializers.CharField(source="concept.category")

    class Meta:
        model = UnitConcept
        fields = ["concept", "category", "iou", "rank"]


class UnitListSerializer(serializers.ListSerializer):
    """Reads the top concepts of every unit of a page in one query."""

    def to_representation(self, data):
        units = list(data.all() if hasattr(data, "all") else data)
        top = selectors.unit_top_concepts(unit_ids=[unit.pk for unit in units])
        for unit in units:
            unit.top_concept_rows = top[unit.pk]
        return super().to_representation(units)


class UnitSerializer(serializers.ModelSerializer):
    model_name = serializers.CharField(source="model.name", read_only=True)
    label = serializers.CharField(source="label.name", default=None, read_only=True)
    category = serializers.CharField(source="label.category", default=None, read_only=True)
    top_concepts = serializers.SerializerMethodField()
    iou_ci = serializers.SerializerMethodField(help_text="95% bootstrap interval of the label's IoU [low, high]")
    stability = serializers.FloatField(
        read_only=True, allow_null=True, help_text="share of bootstrap resamples in which the label stays the argmax"
    )
    runner_up = serializers.CharField(source="runner_up.name", default=None, read_only=True)
    runner_up_category = serializers.CharField(source="runner_up.category", default=None, read_only=True)
    runner_up_iou = serializers.FloatField(read_only=True, allow_null=True)
    margin = serializers.SerializerMethodField(help_text="iou - runner_up_iou")
    chance_iou = serializers.FloatField(
        read_only=True, allow_null=True, help_text="the label's IoU if the unit were independent of it (given position)"
    )
    p_value = serializers.FloatField(
        read_only=True, allow_null=True, help_text="one-sided p of the label's IoU above chance_iou"
    )

    class Meta:
        model = Unit
        list_serializer_class = UnitListSerializer
        fields = [
            "id",
            "job",
            "model",
            "model_name",
            "layer",
            "unit",
            "label",
            "category",
            "iou",
            "threshold",
            "top_concepts",
            "iou_ci",
            "stability",
            "runner_up",
            "runner_up_category",
            "runner_up_iou",
            "margin",
            "chance_iou",
            "p_value",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.ListField(child=serializers.FloatField(), allow_null=True))
    def get_iou_ci(self, unit: Unit) -> list[float] | None:
        return None if unit.iou_low is None or unit.iou_high is None else [unit.iou_low, unit.iou_high]

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_margin(self, unit: Unit) -> float | None:
        return None if unit.runner_up_iou is None else unit.iou - unit.runner_up_iou

    @extend_schema_field(UnitConceptSerializer(many=True))
    def get_top_concepts(self, unit: Unit) -> list[dict]:
        rows = getattr(unit, "top_concept_rows", None)
        return rows if rows is not None else selectors.unit_top_concepts(unit_ids=[unit.pk])[unit.pk]


class UnitDetailSerializer(UnitSerializer):
    top_images = serializers.JSONField(read_only=True)
    image_url = serializers.SerializerMethodField()

    class Meta(UnitSerializer.Meta):
        fields = [*UnitSerializer.Meta.fields, "top_images", "image_url"]
        read_only_fields = fields

    def get_image_url(self, unit: Unit) -> str | None:
        request = self.context.get("request")
        path = f"/api/units/{unit.pk}/image/"
        return request.build_absolute_uri(path) if request else path


class ConceptSerializer(serializers.ModelSerializer):
    units = serializers.IntegerField(read_only=True)
    models = serializers.IntegerField(read_only=True)
    best_iou = serializers.FloatField(read_only=True)

    class Meta:
        model = Concept
        fields = ["id", "name", "category", "units", "models", "best_iou"]
        read_only_fields = fields


class Meta:
    model = LayerResult
    fields = ["job", "layer", "units", "summary"]
    read_only_fields = fields


class ModelLayerSerializer(serializers.Serializer):
    """One dissectable layer of a model, with its latest dissection."""

    layer = serializers.CharField(help_text="the dotted layer name (to pass as params.layers / params.layer)")
    type = serializers.CharField(required=False, allow_null=True, default=None, help_text="the module's class")
    units = serializers.IntegerField()
    height = serializers.IntegerField(required=False, allow_null=True, default=None)
    width = serializers.IntegerField(required=False, allow_null=True, default=None)
    kind = serializers.CharField(
        required=False,
        allow_null=True,
        default=None,
        help_text="map, channels_last, tokens (on a height x width patch grid) or vector; null: not listed",
    )
    prefix = serializers.ListField(
        child=serializers.CharField(), required=False, default=list, help_text="tokens left out of the map"
    )
    element = serializers.IntegerField(required=False, allow_null=True, default=None)
    description = serializers.CharField(required=False, allow_null=True, default=None)
    job = serializers.IntegerField(allow_null=True, help_text="the latest succeeded dissection of the layer")
    summary = serializers.JSONField(allow_null=True, help_text="that dissection's layer summary")


class HealthSerializer(serializers.Serializer):
    status = serializers.CharField()
    database = serializers.DictField()
    broker = serializers.DictField()
    workers = serializers.DictField()


class AblationCurveSerializer(serializers.ModelSerializer):
    class Meta:
        model = AblationCurve
        fields = [
            "class_index",
            "class_name",
            "k",
            "baseline",
            "removed_top",
            "kept_top",
            "removed_top_accuracy",
            "kept_top_accuracy",
        ]
        read_only_fields = fields


class AblationSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    summary = serializers.JSONField()
    curves = AblationCurveSerializer(many=True)


class ImportantUnitSerializer(serializers.Serializer):
    unit = serializers.IntegerField()
    rank = serializers.IntegerField()
    balanced_accuracy = serializers.FloatField(help_text="the class's balanced accuracy with this unit removed")
    drop = serializers.FloatField(help_text="baseline balanced accuracy minus the above")
    margin_drop = serializers.FloatField(help_text="mean drop of the class's logit margin on its own images")
    label = serializers.CharField(allow_null=True, help_text="the unit's concept in the latest dissection")
    iou = serializers.FloatField(allow_null=True)


class ImportantUnitsSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    layer = serializers.CharField()
    class_name = serializers.CharField()
    units = ImportantUnitSerializer(many=True)


class PaintSerializer(serializers.Serializer):
    layer = serializers.CharField(max_length=200, help_text="the generator layer whose units are edited")
    concept = serializers.CharField(max_length=200, help_text="a concept of the layer's dissection, e.g. tree")
    mode = serializers.ChoiceField(choices=["add", "erase"], default="add")
    seed = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)
    index = serializers.IntegerField(
        min_value=0, max_value=2**31 - 1, default=0, help_text="which sample of the seed's latents"
    )
    mask = serializers.ListField(
        child=serializers.ListField(child=serializers.IntegerField(min_value=0, max_value=1), max_length=1024),
        min_length=1,
        max_length=1024,
        help_text="rows of 0/1 at any resolution (resized to the layer's feature map): where to edit",
    )
    k = serializers.IntegerField(min_value=1, default=20, help_text="how many of the concept's top units")
    quantile = serializers.FloatField(
        min_value=0.5, max_value=0.99999, default=0.995, help_text="inserted value: each unit's activation quantile"
    )
    dissection = serializers.IntegerField(min_value=1, required=False, help_text="default: the latest")

    def validate_mask(self, rows: list[list[int]]) -> list[list[int]]:
        width = len(rows[0])
        if width == 0 or any(len(row) != width for row in rows):
            raise serializers.ValidationError("mask must be a rectangle: rows of equal, non-zero length")
        if not any(any(row) for row in rows):
            raise serializers.ValidationError("mask selects no position (all zeros)")
        return rows


class PaintResultSerializer(serializers.Serializer):
    before = serializers.CharField(help_text="PNG, base64")
    after = serializers.CharField(help_text="PNG, base64")
    units = serializers.ListField(child=serializers.IntegerField())
    milliseconds = serializers.FloatField(help_text="time the worker spent")
    dissection = serializers.IntegerField()

"""Tables: registered networks and datasets, jobs, and every dissected unit with its scores."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

# A unit whose label has at least this IoU is a detector of that concept (the paper's 0.04):
# GET /api/concepts/ counts them by default, from ConceptStat.
DETECTOR_MIN_IOU = 0.04
# How a layer's output is laid out as unit maps (dissect_core.layouts).
LAYER_KINDS = ("map", "channels_last", "tokens", "vector")
ARCH_SPECS = "torchvision:NAME, timm:NAME, builtin:NAME, torchscript or exported (a torch.export .pt2)"


def arch_spec_problem(arch: str) -> str | None:
    """Why ``arch`` is not an architecture spec the service loads (None when it is one)."""
    scheme, _, name = arch.partition(":")
    if arch in ("torchscript", "exported") or (scheme in ("torchvision", "timm", "builtin") and name):
        return None
    return f"arch must be {ARCH_SPECS}"


class NetworkModel(models.Model):
    """A registered network (classifier, generator or segmenter) and where its weights lie.

    Generators take a latent of ``latent_dim`` numbers and produce images in ``output_range``.
    Segmenters map images to per-pixel scores over ``classes`` (index 0 = background), one
    category per class in ``categories``; they serve as concept sources for generated images.
    """

    class Kind(models.TextChoices):
        CLASSIFIER = "classifier"
        GENERATOR = "generator"
        SEGMENTER = "segmenter"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="network_models")
    name = models.CharField(max_length=200)
    arch = models.CharField(max_length=200)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.CLASSIFIER)
    num_classes = models.PositiveIntegerField(null=True, blank=True)
    input_size = models.PositiveIntegerField(default=224)
    mean = models.JSONField(default=list)
    std = models.JSONField(default=list)
    weights_path = models.CharField(max_length=1000)
    classes = models.JSONField(default=list, blank=True)
    categories = models.JSONField(default=list, blank=True)
    latent_dim = models.PositiveIntegerField(null=True, blank=True)
    output_range = models.JSONField(default=list, blank=True)
    layers = models.JSONField(default=list, blank=True)
    # Layers that ran on the probe but cannot be laid out as unit maps: name -> why.
    layer_problems = models.JSONField(default=dict, blank=True)
    public = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "nd_model"
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["owner", "public"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.arch})"


class Dataset(models.Model):
    """A registered concept dataset: a Broden directory, an image folder, or synthetic scenes."""

    class Format(models.TextChoices):
        BRODEN = "broden"
        IMAGEFOLDER = "imagefolder"
        SYNTHETIC = "synthetic"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    format = models.CharField(max_length=20, choices=Format.choices)
    path = models.CharField(max_length=1000)
    concepts_source = models.CharField(max_length=50, default="masks")
    image_count = models.PositiveIntegerField(default=0)
    image_size = models.JSONField(default=list)
    mask_size = models.JSONField(default=list)
    categories = models.JSONField(default=list)
    concept_count = models.PositiveIntegerField(default=0)
    classes = models.JSONField(default=list, blank=True)
    public = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "nd_dataset"
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.format})"

    @property
    def spec(self) -> str:
        return f"{'broden' if self.format == 'synthetic' else self.format}:{self.path}"


class Concept(models.Model):
    """A visual concept by name and category, shared by every dataset that names it."""

    name = models.CharField(max_length=200)
    category = models.CharField(max_length=100)

    class Meta:
        db_table = "nd_concept"
        ordering = ["category", "name"]
        constraints = [models.UniqueConstraint(fields=["name", "category"], name="concept_name_category")]

    def __str__(self) -> str:
        return f"{self.name} ({self.category})"


class Job(models.Model):
    """A unit of work for the workers. Its state changes only through api.services."""

    class Type(models.TextChoices):
        DISSECT = "dissect"
        ABLATE = "ablate"
        ATTACK = "attack"
        UNIT_CLASSIFIER = "unit_classifier"
        GENERATOR_REMOVE = "generator_remove"
        GENERATOR_INSERT = "generator_insert"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    FINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    type = models.CharField(max_length=40, choices=Type.choices)
    model = models.ForeignKey(NetworkModel, on_delete=models.CASCADE, related_name="jobs")
    # None for generator jobs: their images are generated and segmented (params.concepts).
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="jobs", null=True, blank=True)
    params = models.JSONField(default=dict)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    phase = models.CharField(max_length=40, blank=True, default="")
    progress = models.FloatField(default=0.0)
    images_done = models.PositiveIntegerField(default=0)
    images_total = models.PositiveIntegerField(default=0)
    eta_seconds = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True, default="")
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    heartbeat = models.DateTimeField(null=True, blank=True)
    results_path = models.CharField(max_length=1000, blank=True, default="")
    stage = models.CharField(max_length=40, blank=True, default="")
    summary = models.JSONField(default=dict, blank=True)
    # Where the job resource is POSTed when it ends (and every callback_progress percent, when set).
    callback_url = models.CharField(max_length=2000, blank=True, default="")
    callback_progress = models.PositiveSmallIntegerField(null=True, blank=True)

    class Meta:
        db_table = "nd_job"
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["status", "heartbeat"]), models.Index(fields=["owner", "-created"])]

    def __str__(self) -> str:
        return f"job {self.pk} {self.type} {self.status}"

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL


class JobShard(models.Model):
    """One slice of a sharded job's images for one stage (quantile, refineN, count)."""

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="shards")
    stage = models.CharField(max_length=40)
    index = models.PositiveIntegerField()
    start = models.PositiveIntegerField()
    stop = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    images_done = models.PositiveIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True, default="")
    heartbeat = models.DateTimeField(null=True, blank=True)
    path = models.CharField(max_length=1000, blank=True, default="")
    started = models.DateTimeField(null=True, blank=True)  # of its last attempt
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "nd_job_shard"
        ordering = ["job_id", "stage", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "stage", "index"], name="shard_job_stage_index")]
        indexes = [models.Index(fields=["status", "heartbeat"])]

    def __str__(self) -> str:
        return f"job {self.job_id} {self.stage} shard {self.index}"


# A label at or above this stability (share of bootstrap resamples it wins) is stable; the
# dashboard marks the others. GET /api/concepts/ reads summary rows at this bar and at
# SIGNIFICANT_P_MAX (p_value <= it), and counts the units for any other.
STABLE_LABEL_MIN = 0.9
SIGNIFICANT_P_MAX = 0.01


class Unit(models.Model):
    """One dissected unit (channel) of one layer, as one job measured it."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="units")
    model = models.ForeignKey(NetworkModel, on_delete=models.CASCADE, related_name="units")
    layer = models.CharField(max_length=200)
    unit = models.PositiveIntegerField()
    label = models.ForeignKey(Concept, on_delete=models.PROTECT, null=True, related_name="labelled_units")
    # Copy of label.name ("" when unlabelled), written with the unit by services.layer_result_store
    # (concept names never change): ?concept=NAME is then one equality on an ordered index even
    # when the name exists in several categories.
    label_name = models.CharField(max_length=200, blank=True, default="")
    iou = models.FloatField()
    threshold = models.FloatField()
    top_images = models.JSONField(default=list)
    # The label's evidence (dissect_core.evidence), null when the job computed none (single
    # block, fewer than two non-empty blocks, an older job) or the unit has no label.
    iou_low = models.FloatField(null=True, blank=True)
    iou_high = models.FloatField(null=True, blank=True)
    stability = models.FloatField(null=True, blank=True)
    runner_up = models.ForeignKey(
        Concept, on_delete=models.PROTECT, null=True, blank=True, related_name="runner_up_units", db_index=False
    )
    runner_up_iou = models.FloatField(null=True, blank=True)
    chance_iou = models.FloatField(null=True, blank=True)
    p_value = models.FloatField(null=True, blank=True)
    # The unit's top-K concepts as GET /api/units/ renders them (compact JSON text, the same
    # values as its UnitConcept rows), so that a page of units reads no score rows
    # (api.unit_page). Empty for units stored before migration 0015 (and where an IoU is not
    # finite): the list reads their scores then.
    top_concepts_json = models.TextField(blank=True, default="", editable=False)
    # Who may read the unit, a copy of its job's and model's state: None, no one (the job has
    # not succeeded); 0, everyone (the model is public); else the job owner's user id. The unit
    # list's lean path (api.unit_page) filters on it instead of joining every unit to its job
    # and model. Postgres keeps it (triggers of migration 0018: on a unit's insert, a job's
    # status or owner, a model's publicity); it stays None on other databases, whose reads join.
    audience = models.BigIntegerField(null=True, blank=True, editable=False)
    # The unit as GET /api/units/ renders it (compact JSON text), so that a page of units reads
    # one column (api.unit_page). Postgres writes it (a row trigger of migration 0019, from the
    # row's columns, its concepts' names and its model's name); empty where the unit has no
    # top_concepts_json, on units stored before 0019 and on other databases: built at read time.
    page_json = models.TextField(blank=True, default="", db_default="", editable=False)

    class Meta:
        db_table = "nd_unit"
        ordering = ["-iou", "id"]
        constraints = [models.UniqueConstraint(fields=["job", "layer", "unit"], name="unit_job_layer_unit")]
        # Each index serves one read of GET /api/units/ in its (-iou, id) order, so that a page
        # is an ordered index walk that stops after page_size rows: ?concept=, ?model=&layer=,
        # and no filter / ?min_iou= / ?category=.
        indexes = [
            models.Index(fields=["label_name", "-iou", "id"], name="unit_label_name_iou_id"),
            models.Index(fields=["model", "layer", "-iou", "id"], name="unit_model_layer_iou_id"),
            models.Index(fields=["-iou", "id"], name="nd_unit_iou_474750_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.layer}#{self.unit}"


class UnitConcept(models.Model):
    """One of a unit's top-K concepts (K = settings.UNIT_TOP_CONCEPTS) with its IoU."""

    unit = models.ForeignKey(Unit, on_delete=models.CASCADE, related_name="scores")
    concept = models.ForeignKey(Concept, on_delete=models.PROTECT, related_name="unit_scores")
    rank = models.PositiveSmallIntegerField()
    iou = models.FloatField()

    class Meta:
        db_table = "nd_unit_concept"
        ordering = ["unit_id", "rank"]
        constraints = [models.UniqueConstraint(fields=["unit", "concept"], name="unitconcept_unit_concept")]
        indexes = [models.Index(fields=["concept", "-iou"])]

    def __str__(self) -> str:
        return f"unit {self.unit_id} #{self.rank}: concept {self.concept_id} ({self.iou:.3f})"


class LayerResult(models.Model):
    """Per-layer outcome of a dissection job: summary and the full IoU matrix file."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="layer_results")
    layer = models.CharField(max_length=200)
    units = models.PositiveIntegerField()
    summary = models.JSONField(default=dict)
    matrix_path = models.CharField(max_length=1000, blank=True, default="")

    class Meta:
        db_table = "nd_layer_result"
        ordering = ["job_id", "id"]
        constraints = [models.UniqueConstraint(fields=["job", "layer"], name="layerresult_job_layer")]

    def __str__(self) -> str:
        return f"job {self.job_id} {self.layer}"


class ClassUnitImportance(models.Model):
    """How much one class's balanced accuracy drops when one unit alone is removed (an ablate job)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="importances")
    model = models.ForeignKey(NetworkModel, on_delete=models.CASCADE, related_name="importances")
    layer = models.CharField(max_length=200)
    class_index = models.PositiveIntegerField()
    class_name = models.CharField(max_length=200)
    rank = models.PositiveIntegerField()
    unit = models.PositiveIntegerField()
    balanced_accuracy = models.FloatField()
    drop = models.FloatField()
    margin_drop = models.FloatField()

    class Meta:
        db_table = "nd_class_unit_importance"
        ordering = ["job_id", "class_index", "rank"]
        constraints = [models.UniqueConstraint(fields=["job", "class_index", "unit"], name="importance_job_class_unit")]
        indexes = [models.Index(fields=["model", "class_name", "job", "rank"])]

    def __str__(self) -> str:
        return f"job {self.job_id} {self.class_name} #{self.rank}: unit {self.unit}"


class AblationCurve(models.Model):
    """One point of the paper's Figure 2c curves: a class with its k most important units removed,
    or with all units but those removed (validation split)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="curves")
    class_index = models.PositiveIntegerField()
    class_name = models.CharField(max_length=200)
    k = models.PositiveIntegerField()
    baseline = models.FloatField(null=True)
    removed_top = models.FloatField(null=True)
    kept_top = models.FloatField(null=True)
    removed_top_accuracy = models.FloatField()
    kept_top_accuracy = models.FloatField()

    class Meta:
        db_table = "nd_ablation_curve"
        ordering = ["job_id", "class_index", "k"]
        constraints = [models.UniqueConstraint(fields=["job", "class_index", "k"], name="curve_job_class_k")]

    def __str__(self) -> str:
        return f"job {self.job_id} {self.class_name} k={self.k}"


class WorkerHeartbeat(models.Model):
    """A live worker process reports here every few seconds; /api/health/ counts the fresh ones."""

    hostname = models.CharField(max_length=255, unique=True)
    pid = models.PositiveIntegerField()
    device = models.CharField(max_length=50, default="cpu")
    started = models.DateTimeField()
    last_seen = models.DateTimeField()

    class Meta:
        db_table = "nd_worker"
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname


def visible_to(user) -> Q:
    """Rows a user may read: their own and public ones."""
    return Q(owner=user) | Q(public=True)


class IdempotencyKey(models.Model):
    """A client's ``Idempotency-Key`` on a create request, and the response it got: the same key
    and body within IDEMPOTENCY_TTL answer that response again (api.services.idempotency)."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="idempotency_keys")
    scope = models.CharField(max_length=40)  # which create: "models", "datasets", "jobs"
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)  # sha256 of the request's fields and files
    status = models.PositiveSmallIntegerField()
    body = models.JSONField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "nd_idempotency_key"
        constraints = [models.UniqueConstraint(fields=["owner", "scope", "key"], name="idempotency_owner_scope_key")]
        indexes = [models.Index(fields=["owner", "created"])]

    def __str__(self) -> str:
        return f"{self.scope} {self.key!r} of user {self.owner_id}"


class WebhookSecret(models.Model):
    """A user's key for signing the webhooks of their jobs (HMAC-SHA256)."""

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhook_secret")
    secret = models.CharField(max_length=64)
    created = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "nd_webhook_secret"

    def __str__(self) -> str:
        return f"webhook secret of user {self.owner_id}"


class WebhookDelivery(models.Model):
    """One webhook of a job (an event and the job resource then), with its delivery attempts."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="deliveries")
    delivery_id = models.UUIDField(unique=True)
    event = models.CharField(max_length=20)  # succeeded, failed, cancelled or progress
    url = models.CharField(max_length=2000)
    payload = models.JSONField()
    attempts = models.PositiveIntegerField(default=0)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    created = models.DateTimeField(auto_now_add=True)
    last_attempt = models.DateTimeField(null=True, blank=True)
    next_attempt = models.DateTimeField(null=True, blank=True)  # null: delivered, or given up
    delivered = models.BooleanField(default=False)

    class Meta:
        db_table = "nd_webhook_delivery"
        ordering = ["job_id", "id"]
        indexes = [models.Index(fields=["next_attempt"])]

    def __str__(self) -> str:
        return f"{self.event} of job {self.job_id} ({self.attempts} attempts)"

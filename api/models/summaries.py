"""The summaries that GET /api/concepts/ reads instead of the units: per model
(:class:`ConceptStat`), per visibility scope (:class:`ConceptStatScope`), and the IoU cells
that answer any threshold (:class:`ConceptIouCell`)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from api.models.core import Concept, NetworkModel


class ConceptStat(models.Model):
    """Detectors of one concept in one model, over the succeeded jobs of one owner: a summary of
    nd_unit (units with iou >= DETECTOR_MIN_IOU). One row per ``bar``: all detectors, those with
    a stable label (stability >= STABLE_LABEL_MIN), those above chance (p_value <=
    SIGNIFICANT_P_MAX), and those with both. GET /api/concepts/ reads the per-scope sums
    (:class:`ConceptStatScope`), which the embedded SQLite builds from these rows.

    Rewritten per model by services.concept_stats_refresh (job_succeed calls it); data loaded
    around the services needs ``manage.py concept_stats_rebuild``.
    """

    class Bar(models.TextChoices):
        ALL = "all"
        STABLE = "stable"
        SIGNIFICANT = "significant"
        BOTH = "both"

    bar = models.CharField(max_length=12, choices=Bar.choices, default=Bar.ALL)
    concept = models.ForeignKey(Concept, on_delete=models.CASCADE, related_name="stats", db_index=False)
    model = models.ForeignKey(NetworkModel, on_delete=models.CASCADE, related_name="concept_stats")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="concept_stats")
    units = models.PositiveIntegerField()
    best_iou = models.FloatField()

    class Meta:
        db_table = "nd_concept_stat"
        ordering = ["bar", "concept_id", "model_id", "owner_id"]
        # One row per bar, concept, model and owner; the FK indexes serve the per-model
        # refresh (model) and a user's deletion (owner).
        constraints = [
            models.UniqueConstraint(
                fields=["bar", "concept", "model", "owner"],
                include=["units", "best_iou"],
                name="conceptstat_bar_concept_model_owner",
            )
        ]

    def __str__(self) -> str:
        return f"{self.concept_id} in model {self.model_id} (owner {self.owner_id}): {self.units}"


SCOPE_BUCKETS = 4  # the scope rows split each scope by model id modulo this


class _ScopeRow(models.Model):
    """Where a scope row belongs: a bar, a scope (null: the public models) and a bucket of models."""

    bar = models.CharField(max_length=12, choices=ConceptStat.Bar.choices, default=ConceptStat.Bar.ALL)
    scope_owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="+", db_index=False
    )
    bucket = models.PositiveSmallIntegerField(default=0)  # model id % SCOPE_BUCKETS

    class Meta:
        abstract = True

    def _where(self) -> str:
        scope = "public" if self.scope_owner_id is None else f"owner {self.scope_owner_id}"
        return f"{scope}, {self.bar}, bucket {self.bucket}"


class ConceptStatScope(_ScopeRow):
    """One concept's detectors (IoU >= DETECTOR_MIN_IOU) over a visibility scope: every public
    model (``scope_owner`` null), or one user's jobs on models that are not public. A user sees
    exactly the public scope and their own (a unit is public iff its model is), which share no
    model, so GET /api/concepts/ adds a few rows per concept rather than one per model: units
    and model counts add, best IoUs take the max. Each scope is split into SCOPE_BUCKETS rows
    per concept and bar by model id, so that a job rewrites its model's bucket only.

    Rewritten per scope and bucket (services.concept_scopes_refresh): by concept_stats_refresh
    for the model it rewrites, when a model's ``public`` changes or a model or user is deleted
    (api.signals), and whole by ``concept_stats_rebuild``. On Postgres from the units, with its
    :class:`ConceptIouCell` rows; elsewhere summed from ConceptStat.
    """

    concept = models.ForeignKey(Concept, on_delete=models.CASCADE, related_name="scope_stats", db_index=False)
    units = models.PositiveIntegerField()
    model_count = models.PositiveIntegerField()
    best_iou = models.FloatField()

    class Meta:
        db_table = "nd_concept_stat_scope"
        ordering = ["bar", "scope_owner_id", "concept_id", "bucket"]
        # Covers the read: one bar, the public scope and the user's, every concept.
        constraints = [
            models.UniqueConstraint(
                fields=["bar", "scope_owner", "concept", "bucket"],
                include=["units", "model_count", "best_iou"],
                nulls_distinct=False,
                name="conceptstatscope_bar_owner_concept_bucket",
            )
        ]

    def __str__(self) -> str:
        return f"{self.concept_id} ({self._where()}): {self.units} in {self.model_count} models"


IOU_CELL_UNITS = 1000  # about this many labelled units per ConceptIouCell (ties stay in one cell)


class ConceptIouCell(_ScopeRow):
    """One cell of a scope's labelled units by IoU (for one bar and bucket, as
    :class:`ConceptStatScope`), for GET /api/concepts/ at any ``min_iou`` (Postgres only).

    A scope's units, sorted by IoU, are cut into cells of about IOU_CELL_UNITS units; the cell
    holds the IoUs in [``lo``, the next cell's ``lo``) (the first cell's ``lo`` is -infinity).
    Each cell row carries, per concept, what lies above the cell (``above_*``: units, models
    whose best unit for the concept lies there, best IoU), and every unit in the cell (its
    concept and IoU) and every model's best in it. The units at or above a threshold t are then
    those above the cell holding t plus that cell's units with IoU >= t: a request reads one row
    per scope and bucket, whatever the number of units, and counts exactly.
    """

    lo = models.FloatField()
    above_concepts = ArrayField(models.IntegerField())
    above_units = ArrayField(models.IntegerField())
    above_models = ArrayField(models.IntegerField())
    above_best = ArrayField(models.FloatField())
    unit_concepts = ArrayField(models.IntegerField())
    unit_ious = ArrayField(models.FloatField())
    model_concepts = ArrayField(models.IntegerField())
    model_ious = ArrayField(models.FloatField())

    class Meta:
        db_table = "nd_concept_iou_cell"
        ordering = ["scope_owner_id", "bucket", "bar", "lo"]
        # Serves the read (the last cell with lo <= t) and a scope's rewrite.
        constraints = [
            models.UniqueConstraint(
                fields=["scope_owner", "bucket", "bar", "lo"],
                nulls_distinct=False,
                name="conceptioucell_owner_bucket_bar_lo",
            )
        ]

    def __str__(self) -> str:
        return f"IoU >= {self.lo} ({self._where()}): {len(self.unit_ious)} units"

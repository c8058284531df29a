from __future__ import annotations

import django_filters

from api.models import Concept, Job, Unit


class UnitFilter(django_filters.FilterSet):
    model = django_filters.NumberFilter(field_name="model_id")
    job = django_filters.NumberFilter(field_name="job_id")
    layer = django_filters.CharFilter(field_name="layer")
    concept = django_filters.CharFilter(field_name="label_name")
    category = django_filters.CharFilter(field_name="label__category")
    min_iou = django_filters.NumberFilter(field_name="iou", lookup_expr="gte")
    min_stability = django_filters.NumberFilter(
        field_name="stability",
        lookup_expr="gte",
        help_text="labels that stay the argmax in at least this share of resamples",
    )
    max_p_value = django_filters.NumberFilter(
        field_name="p_value", lookup_expr="lte", help_text="labels whose IoU is above chance with p at most this"
    )

    class Meta:
        model = Unit
        fields = ["model", "job", "layer", "concept", "category", "min_iou", "min_stability", "max_p_value"]


class JobFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=Job.Status.choices)
    model = django_filters.NumberFilter(field_name="model_id")

    class Meta:
        model = Job
        fields = ["status", "model", "type"]


class ConceptFilter(django_filters.FilterSet):
    category = django_filters.CharFilter(field_name="category")
    name = django_filters.CharFilter(field_name="name", lookup_expr="icontains")

    class Meta:
        model = Concept
        fields = ["category", "name"]

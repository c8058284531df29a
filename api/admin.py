from django.contrib import admin

from api.models import Concept, Dataset, Job, NetworkModel, Unit

admin.site.register([NetworkModel, Dataset, Job])


@admin.register(Concept)
class ConceptAdmin(admin.ModelAdmin):
    # Units copy their concepts' names (Unit.label_name, Unit.top_concepts_json): a concept's
    # name and category never change.
    readonly_fields = ("name", "category")


@admin.register(Unit)
class UnitAdmin(admin.ModelAdmin):
    # A unit is a measurement, written once with its job's results (with copies of its
    # concepts' names that an edit would leave behind).
    def has_change_permission(self, request, obj=None) -> bool:
        return False

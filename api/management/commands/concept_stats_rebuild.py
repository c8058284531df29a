from __future__ import annotations

import time

from django.core.management.base import BaseCommand
from django.db import connection

from api import services
from api.models import ConceptIouCell, ConceptStat, ConceptStatScope, NetworkModel


class Command(BaseCommand):
    help = (
        "Recompute the concept summary rows (nd_concept_stat per model; nd_concept_stat_scope and "
        "nd_concept_iou_cell per scope) "
        "that GET /api/concepts/ reads, "
        "for every model: after loading units around the services (a restore, a bulk COPY). "
        "First, every unit's audience (who may read it) where it differs from its job's and model's, "
        "and every unit's page JSON (what GET /api/units/ returns) where it is missing."
    )

    def handle(self, *args, **options):
        started = time.perf_counter()
        repaired = services.unit_audiences_repair()
        if repaired:
            self.stdout.write(f"unit audiences: {repaired} units set from their job and model")
        pages = services.unit_pages_fill()
        if pages:
            self.stdout.write(f"unit pages: {pages} units written")
        model_ids = list(NetworkModel.objects.order_by("id").values_list("id", flat=True))
        rows = sum(services.concept_stats_refresh(model_id=pk, scopes=False) for pk in model_ids)
        scopes = services.concept_scopes_rebuild()
        if connection.vendor == "postgresql":
            # Fresh statistics, and (outside a transaction) the visibility map that lets the
            # read scan the covering index alone.
            vacuum = "ANALYZE" if connection.in_atomic_block else "VACUUM (ANALYZE)"
            with connection.cursor() as cursor:
                for model in (ConceptStat, ConceptStatScope, ConceptIouCell):
                    cursor.execute(f"{vacuum} {connection.ops.quote_name(model._meta.db_table)}")
        self.stdout.write(
            f"concept stats: {rows} rows for {len(model_ids)} models, {scopes} scope rows,"
            f" in {time.perf_counter() - started:.1f} s"
        )

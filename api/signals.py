"""Keep ConceptStatScope true when rows change around the services (the admin, a shell): a
model made public or private, a model or a user deleted; and fill it after ``migrate`` when
it is empty while labelled units exist (a store upgraded to migration 0016). The services
refresh scopes themselves (concept_stats_refresh)."""

from __future__ import annotations

from django.conf import settings
from django.db import connections
from django.db.models.signals import post_delete, post_migrate, post_save, pre_delete, pre_save
from django.dispatch import receiver

from api.models import SCOPE_BUCKETS, NetworkModel


def _scopes_of(model: NetworkModel, public: bool) -> list[int | None]:
    from api.services.concepts import job_owners

    return [None] if public else list(job_owners(model_id=model.pk))


def _refresh(scopes: list[int | None], bucket: int | None = None) -> None:
    from api.services.concepts import concept_scopes_refresh

    if scopes:
        concept_scopes_refresh(scopes=scopes, bucket=bucket)


@receiver(pre_save, sender=NetworkModel)
def _note_visibility(sender, instance: NetworkModel, update_fields=None, **kwargs) -> None:
    instance._was_public = None
    if instance.pk is None or (update_fields is not None and "public" not in update_fields):
        return  # a new model, or a save that cannot change its visibility
    instance._was_public = NetworkModel.objects.filter(pk=instance.pk).values_list("public", flat=True).first()


@receiver(post_save, sender=NetworkModel)
def _visibility_changed(sender, instance: NetworkModel, created: bool, **kwargs) -> None:
    was = getattr(instance, "_was_public", None)
    if created or was is None or was == instance.public:
        return
    # Its rows leave one side and join the other: the public scope and its jobs' owners'.
    _refresh([None, *_scopes_of(instance, public=False)], instance.pk % SCOPE_BUCKETS)


@receiver(pre_delete, sender=NetworkModel)
def _note_scopes(sender, instance: NetworkModel, **kwargs) -> None:
    instance._scopes = _scopes_of(instance, instance.public)
    instance._bucket = instance.pk % SCOPE_BUCKETS  # the pk is gone after the delete


@receiver(post_delete, sender=NetworkModel)
def _model_deleted(sender, instance: NetworkModel, **kwargs) -> None:
    _refresh(getattr(instance, "_scopes", []), getattr(instance, "_bucket", None))


@receiver(post_delete, sender=settings.AUTH_USER_MODEL)
def _user_deleted(sender, instance, **kwargs) -> None:
    # Their own scope went with them (cascade); their jobs on public models leave the public one.
    _refresh([None])


@receiver(post_migrate)
def _fill_scopes_after_upgrade(sender, app_config=None, using="default", **kwargs) -> None:
    if app_config is None or app_config.label != "api":
        return
    from api.models import ConceptIouCell, ConceptStatScope, Unit
    from api.services.concepts import concept_scopes_rebuild

    # A table empty (a new database, or an upgrade that added one) while labelled units exist;
    # the IoU cells exist on Postgres only.
    tables = [ConceptStatScope, *([ConceptIouCell] if connections[using].vendor == "postgresql" else [])]
    if not {t._meta.db_table for t in tables} <= set(connections[using].introspection.table_names()):
        return  # migrated back to before them
    empty = not all(table.objects.using(using).exists() for table in tables)
    if empty and Unit.objects.using(using).filter(label__isnull=False).exists():
        concept_scopes_rebuild()

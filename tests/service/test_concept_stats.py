"""GET /api/concepts/ at the detector threshold reads per-model summary rows (nd_concept_stat):
the same answer as counting the units, kept current by job_succeed and by the rebuild command."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db

FIELDS = ("id", "name", "category", "units", "models", "best_iou")
CONCEPTS = [("tree", "object"), ("sky", "object"), ("tree", "part"), ("wood", "material"), ("leg", "part")]


def _rows(rows) -> list[tuple]:
    """The rows of concept_list (dicts) or of concept_list_live (a queryset)."""
    return [tuple(row[f] for f in FIELDS) for row in (rows if isinstance(rows, list) else rows.values(*FIELDS))]


def _stat_rows() -> list[tuple]:
    from api.models import ConceptStat

    return sorted(ConceptStat.objects.values_list("concept_id", "model_id", "owner_id", "units", "best_iou"))


@pytest.fixture()
def carol(django_user_model):
    return django_user_model.objects.create_user(username="carol", password="pw-carol")


@pytest.fixture()
def zoo(user, other_user):
    """Two owners, public and private models, several jobs each, units on both sides of 0.04,
    a failed and a running job whose units must not count; written around the services."""
    from api.models import Concept, Dataset, Job, NetworkModel, Unit

    concepts = [Concept.objects.get_or_create(name=n, category=c)[0] for n, c in CONCEPTS]
    dataset = Dataset.objects.create(owner=user, name="d", format="broden", path="/y", public=True)
    models = {
        name: NetworkModel.objects.create(
            owner=owner, name=name, arch="builtin:scenecnn", weights_path="/x", public=public
        )
        for name, owner, public in [
            ("alice-private", user, False),
            ("alice-public", user, True),
            ("bob-public", other_user, True),
            ("bob-private", other_user, False),
        ]
    }
    jobs = [
        ("alice-private", user, "succeeded"),
        ("alice-private", user, "failed"),
        ("alice-public", user, "succeeded"),
        ("alice-public", user, "succeeded"),
        ("alice-public", other_user, "succeeded"),
        ("alice-public", other_user, "running"),
        ("bob-public", other_user, "succeeded"),
        ("bob-private", other_user, "succeeded"),
        ("bob-private", user, "cancelled"),
    ]
    rng = np.random.default_rng(7)
    rows = []
    for i, (model_name, owner, status) in enumerate(jobs):
        model = models[model_name]
        job = Job.objects.create(owner=owner, type="dissect", model=model, dataset=dataset, status=status)
        for u in range(40):
            label = concepts[int(rng.integers(0, len(concepts)))] if u % 9 else None
            iou = [0.0399, 0.04, 0.0401, 0.01, 0.3][u % 5] if u < 10 else float(rng.uniform(0.0, 0.2))
            rows.append(
                Unit(
                    job=job,
                    model=model,
                    layer=f"layer{i % 2}",
                    unit=u,
                    label=label,
                    label_name=label.name if label else "",
                    iou=iou if label else 0.1,
                    threshold=1.0,
                    # evidence on both sides of the bars (0.9 and 0.01 themselves pass), none on some
                    stability=[0.9, 0.89, 1.0, 0.5, None][u % 5 if u % 3 else 4] if label else None,
                    p_value=[0.01, 0.011, 1e-9, 0.3][u % 4] if label and u % 7 else None,
                )
            )
    Unit.objects.bulk_create(rows)
    call_command("concept_stats_rebuild", stdout=io.StringIO())
    return models


def test_the_summary_rows_answer_what_the_units_answer(zoo, user, other_user, carol):
    from api import selectors

    for who in (user, other_user, carol):
        stats = _rows(selectors.concept_list(user=who))
        live = _rows(selectors.concept_list_live(user=who, min_iou=selectors.DETECTOR_MIN_IOU))
        assert stats == live and stats, who
        assert [r[3] for r in stats] == sorted((r[3] for r in stats), reverse=True)
    # Carol owns nothing: she sees the public models' units, whoever ran the jobs.
    assert sum(r[3] for r in _rows(selectors.concept_list(user=carol))) < sum(
        r[3] for r in _rows(selectors.concept_list(user=user))
    )


def test_the_summary_counts_exactly_the_detectors_of_succeeded_jobs(zoo, user):
    from api import selectors
    from api.models import Unit

    units = Unit.objects.filter(job__status="succeeded", label__isnull=False, iou__gte=0.04)
    visible = units.filter(job__owner=user) | units.filter(model__public=True)
    assert sum(r[3] for r in _rows(selectors.concept_list(user=user))) == visible.count()
    assert Unit.objects.filter(
        job__status__in=["failed", "running", "cancelled"], iou__gte=0.04, label__isnull=False
    ).exists()
    assert Unit.objects.filter(iou=0.04, label__isnull=False, job__status="succeeded").exists()


@pytest.mark.parametrize(
    "query",
    [
        "",
        "category=object",
        "category=part",
        "name=TRE",
        "name=o&category=material",
        "ordering=models",
        "ordering=-models",
        "ordering=name",
        "ordering=units",
        "ordering=-name",
        "limit=2",
        "limit=2&offset=2",
        # any other threshold: the IoU cells
        "min_iou=0.1",
        "min_iou=0.0&ordering=name",
        "min_iou=0.0401&ordering=-models",
        "min_iou=0.02&category=part&limit=2&offset=1",
        "min_iou=0.01&name=E&ordering=-name",
        "min_iou=0.3&max_p_value=0.01&ordering=units",
    ],
)
def test_the_endpoint_gives_the_same_page_either_way(zoo, api, other_api, monkeypatch, query):
    from api import concept_counts

    def key(row):
        field = query.split("ordering=")[1].lstrip("-") if "ordering=" in query else None
        return (row[field] if field else 0, row["id"])

    for client in (api, other_api):
        stats = client.get(f"/api/concepts/?{query}").json()
        with monkeypatch.context() as patched:
            patched.setattr(concept_counts, "_concept_stat_bar", lambda *bars: None)  # count the units
            live = client.get(f"/api/concepts/?{query}").json()
        assert stats["count"] == live["count"] > 0
        if "ordering=" in query:  # the ordering replaces ours, ties fall in any order
            assert sorted(stats["results"], key=key) == sorted(live["results"], key=key)
            field = query.split("ordering=")[1]
            values = [row[field.lstrip("-")] for row in stats["results"]]
            assert values == sorted(values, reverse=field.startswith("-"))
        else:
            assert stats["results"] == live["results"]


def test_one_aggregate_query_gives_the_count_and_the_page(zoo, api, user):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from api import selectors

    with CaptureQueriesContext(connection) as queries:
        page = api.get("/api/concepts/?limit=2&offset=1").json()
    assert sum("nd_concept_stat" in q["sql"] for q in queries.captured_queries) == 1
    everything = _rows(selectors.concept_list(user=user))
    assert page["count"] == len(everything)
    assert [tuple(c[f] for f in FIELDS) for c in page["results"]] == everything[1:3]
    beyond = api.get("/api/concepts/?offset=1000").json()
    assert beyond["count"] == len(everything) and beyond["results"] == []


def test_other_thresholds_count_the_units(zoo, api, user):
    from api import selectors

    strict = api.get("/api/concepts/?min_iou=0.1&page_size=100").json()["results"]
    expected = _rows(selectors.concept_list_live(user=user, min_iou=0.1))
    assert [tuple(c[f] for f in FIELDS) for c in strict] == expected
    assert api.get("/api/concepts/?min_iou=0.040").json() == api.get("/api/concepts/").json()


def test_publishing_a_model_shows_its_rows_at_once(zoo, other_user):
    from api import selectors

    before = _rows(selectors.concept_list(user=other_user))
    zoo["alice-private"].public = True
    zoo["alice-private"].save()
    after = _rows(selectors.concept_list(user=other_user))
    assert after != before
    assert after == _rows(selectors.concept_list_live(user=other_user, min_iou=0.04))


def test_the_rebuild_gives_the_rows_the_refreshes_gave(zoo):
    from api import services
    from api.models import ConceptStat

    rows = _stat_rows()
    for model in zoo.values():
        services.concept_stats_refresh(model_id=model.pk)
        services.concept_stats_refresh(model_id=model.pk)
    assert _stat_rows() == rows
    ConceptStat.objects.all().delete()
    out = io.StringIO()
    call_command("concept_stats_rebuild", stdout=out)
    assert _stat_rows() == rows
    assert f"{len(rows)} rows for {len(zoo)} models" in out.getvalue()
    assert services.concept_stats_refresh(model_id=10**9) == 0


def _one_after_the_other(first_call, second_call) -> tuple[bool, list[Exception], bool]:
    """Run ``first_call`` in a transaction held open, then ``second_call`` in another thread.

    Returns: whether the second was still waiting 1 s after it started, the errors of both, and
    whether the second finished once the first committed.
    """
    import threading

    from django.db import connection, transaction

    held, release, second_done = threading.Event(), threading.Event(), threading.Event()
    errors: list[Exception] = []

    def first():
        try:
            with transaction.atomic():
                first_call()
                held.set()
                release.wait(30)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    def second():
        try:
            second_call()
            second_done.set()
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert held.wait(30)
    threads[1].start()
    waited = not second_done.wait(1.0)
    release.set()
    for thread in threads:
        thread.join(30)
    return waited, errors, second_done.is_set()


@pytest.mark.django_db(transaction=True)
def test_two_refreshes_of_one_model_at_once_take_turns(zoo):
    from api import services

    rows = _stat_rows()
    model_id = zoo["alice-public"].pk
    waited, errors, done = _one_after_the_other(
        lambda: services.concept_stats_refresh(model_id=model_id),
        lambda: services.concept_stats_refresh(model_id=model_id),
    )
    assert waited  # waits for the model row the first one holds
    assert errors == [] and done
    assert _stat_rows() == rows


def test_deleting_a_model_deletes_its_rows(zoo, user):
    from api import selectors
    from api.models import ConceptStat

    zoo["alice-public"].delete()
    assert not ConceptStat.objects.filter(model_id=zoo["alice-public"].pk).exists()
    assert _rows(selectors.concept_list(user=user)) == _rows(selectors.concept_list_live(user=user, min_iou=0.04))


# Through the services, as a worker writes and finishes a job.


@pytest.fixture()
def model(user, settings, tmp_path):
    from api.models import NetworkModel

    settings.MEDIA_ROOT = tmp_path / "media"
    return NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x", public=True)


def _run(owner, model, seed: int, *, finish: str = "succeed", scale: float = 1.0):
    from api import services
    from api.models import Dataset, Job

    dataset = Dataset.objects.create(owner=owner, name="d", format="broden", path="/y")
    job = Job.objects.create(owner=owner, type="dissect", model=model, dataset=dataset, status="running")
    rng = np.random.default_rng(seed)
    iou = rng.uniform(0.0, 0.08, size=(30, len(CONCEPTS))) * scale
    iou[0] = 0.0
    for layer in ("conv4", "conv5"):
        services.layer_result_store(
            job=job, layer=layer, thresholds=np.ones(30), iou=iou, concepts=CONCEPTS, summary={}
        )
    if finish == "succeed":
        services.job_succeed(job_id=job.pk)
    elif finish == "fail":
        services.job_fail(job_id=job.pk, message="boom")
    return job


def test_job_succeed_refreshes_its_models_rows(model, user, other_user):
    from api import selectors
    from api.models import ConceptStat, Unit

    first = _run(user, model, 1)
    assert ConceptStat.objects.filter(model=model, owner=user).exists()
    detectors = Unit.objects.filter(job=first, iou__gte=0.04, label__isnull=False).count()
    assert sum(ConceptStat.objects.values_list("units", flat=True)) == detectors > 0
    _run(other_user, model, 2)
    assert set(ConceptStat.objects.values_list("owner_id", flat=True)) == {user.pk, other_user.pk}
    rows = _stat_rows()
    _run(user, model, 3, finish="fail")
    assert _stat_rows() == rows
    for who in (user, other_user):
        assert _rows(selectors.concept_list(user=who)) == _rows(selectors.concept_list_live(user=who, min_iou=0.04))
    call_command("concept_stats_rebuild", stdout=io.StringIO())
    assert _stat_rows() == rows


def test_a_job_without_units_leaves_the_rows_alone(model, user):
    from api import services
    from api.models import ConceptStat, Dataset, Job

    _run(user, model, 1)
    rows = _stat_rows()
    ConceptStat.objects.update(units=999)
    dataset = Dataset.objects.first()
    job = Job.objects.create(owner=user, type="ablate", model=model, dataset=dataset, status="running")
    services.job_succeed(job_id=job.pk)
    assert {r[3] for r in _stat_rows()} == {999}
    services.concept_stats_refresh(model_id=model.pk)
    assert _stat_rows() == rows


@pytest.mark.parametrize(
    "bars",
    [{"min_stability": 0.9}, {"max_p_value": 0.01}, {"min_stability": 0.9, "max_p_value": 0.01}],
)
def test_the_evidence_bars_have_summary_rows_too(zoo, api, user, other_user, carol, bars):
    from urllib.parse import urlencode

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from api import selectors

    for who in (user, other_user, carol):
        stats = _rows(selectors.concept_list(user=who, **bars))
        live = _rows(selectors.concept_list_live(user=who, min_iou=selectors.DETECTOR_MIN_IOU, **bars))
        assert stats == live, (who, bars)
    assert 0 < sum(r[3] for r in stats) < sum(r[3] for r in _rows(selectors.concept_list(user=carol)))
    with CaptureQueriesContext(connection) as queries:
        page = api.get(f"/api/concepts/?{urlencode(bars)}&limit=1000").json()
    assert sum("nd_concept_stat" in q["sql"] for q in queries.captured_queries) == 1
    assert [tuple(c[f] for f in FIELDS) for c in page["results"]] == _rows(selectors.concept_list(user=user, **bars))
    # any other bar counts the units
    other = {key: value * 0.9 for key, value in bars.items()}
    assert _rows(selectors.concept_list(user=user, **other)) == _rows(
        selectors.concept_list_live(user=user, min_iou=selectors.DETECTOR_MIN_IOU, **other)
    )


# The per-scope sums (nd_concept_stat_scope) that the list reads.


def _scope_rows() -> list[tuple]:
    from api.models import ConceptIouCell, ConceptStatScope

    return sorted(
        ConceptStatScope.objects.values_list(
            "bar", "scope_owner_id", "concept_id", "bucket", "units", "model_count", "best_iou"
        ),
        key=lambda r: (r[0], r[1] or 0, r[2], r[3]),
    ) + sorted(
        ConceptIouCell.objects.values_list(
            "bar",
            "scope_owner_id",
            "bucket",
            "lo",
            "above_concepts",
            "above_units",
            "above_models",
            "above_best",
            "unit_concepts",
            "unit_ious",
            "model_concepts",
            "model_ious",
        ),
        key=lambda r: (r[0], r[1] or 0, r[2], r[3]),
    )


# Thresholds on both sides of stored IoUs (the zoo's units sit exactly on 0.0399, 0.04, 0.0401,
# 0.01 and 0.3), below every unit and above every unit.
THRESHOLDS = (-1.0, 0.0, 1e-300, 0.01, 0.0399, 0.04, 0.0401, 0.05, 0.1234, 0.2, 0.3, 0.30000001, 2.0)


def _all_agree(*users, thresholds=(0.04,)) -> None:
    from api import selectors, services

    for who in users:
        for bars in ({}, {"min_stability": 0.9}, {"max_p_value": 0.01}, {"min_stability": 0.9, "max_p_value": 0.01}):
            for t in thresholds:
                live = _rows(selectors.concept_list_live(user=who, min_iou=t, **bars))
                assert _rows(selectors.concept_list(user=who, min_iou=t, **bars)) == live, (who, bars, t)
    rows = _scope_rows()
    services.concept_scopes_rebuild()
    assert _scope_rows() == rows


def test_scopes_follow_jobs_visibility_and_deletions(zoo, user, other_user, carol, settings, tmp_path):
    from api.models import ConceptStatScope

    settings.MEDIA_ROOT = tmp_path / "media"
    _all_agree(user, other_user, carol, thresholds=THRESHOLDS)
    assert ConceptStatScope.objects.filter(scope_owner__isnull=True).exists()
    assert set(ConceptStatScope.objects.values_list("scope_owner_id", flat=True)) == {None, user.pk, other_user.pk}
    _run(carol, zoo["bob-public"], 11)  # a job on someone else's public model
    _run(other_user, zoo["bob-private"], 12)
    _all_agree(user, other_user, carol)
    zoo["bob-private"].public = True  # every side changes at once
    zoo["bob-private"].save()
    _all_agree(user, other_user, carol)
    zoo["alice-public"].public = False
    zoo["alice-public"].save()
    _all_agree(user, other_user, carol, thresholds=THRESHOLDS)
    zoo["alice-public"].delete()
    _all_agree(user, other_user, carol)
    carol.delete()
    _all_agree(user, other_user)
    zoo["alice-private"].delete()
    _all_agree(user, other_user)
    assert not ConceptStatScope.objects.filter(scope_owner=user).exists()  # nothing private of hers is left
    # A private model whose units are all below the detector threshold: no ConceptStat row, but
    # its owner's scope holds their IoUs (for a lower min_iou), and must lose them with it.
    from api.models import ConceptIouCell, NetworkModel

    faint = NetworkModel.objects.create(owner=user, name="faint", arch="builtin:scenecnn", weights_path="/x")
    _run(other_user, faint, 14, scale=0.4)
    assert ConceptIouCell.objects.filter(scope_owner=other_user).exists()
    _all_agree(user, other_user, thresholds=THRESHOLDS)
    faint.delete()
    _all_agree(user, other_user, thresholds=THRESHOLDS)


@pytest.mark.django_db(transaction=True)
def test_two_jobs_finishing_together_rewrite_a_public_bucket_in_turn(zoo, user, other_user, carol, settings, tmp_path):
    from api import services
    from api.models import SCOPE_BUCKETS, NetworkModel

    settings.MEDIA_ROOT = tmp_path / "media"
    second_model = NetworkModel.objects.create(  # in the first model's bucket of the public scope
        pk=zoo["alice-public"].pk + 1000 * SCOPE_BUCKETS,
        owner=other_user,
        name="second",
        arch="builtin:scenecnn",
        weights_path="/x",
        public=True,
    )
    first_job = _run(user, zoo["alice-public"], 21, finish="leave")
    second_job = _run(carol, second_model, 22, finish="leave")
    waited, errors, done = _one_after_the_other(
        lambda: services.job_succeed(job_id=first_job.pk), lambda: services.job_succeed(job_id=second_job.pk)
    )
    assert waited  # another model, the same scope and bucket: waits for its lock
    assert errors == [] and done
    _all_agree(user, other_user, carol)


def test_any_threshold_reads_one_iou_cell_per_scope_and_bucket(zoo, api, user):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from api import selectors

    with CaptureQueriesContext(connection) as queries:
        page = api.get("/api/concepts/?min_iou=0.0401&min_stability=0.9&limit=1000").json()
    sql = [q["sql"] for q in queries.captured_queries if "nd_concept_iou_cell" in q["sql"]]
    assert len(sql) == 1 and "LIMIT 1" in sql[0] and "nd_unit" not in sql[0]
    expected = _rows(selectors.concept_list_live(user=user, min_iou=0.0401, min_stability=0.9))
    assert [tuple(c[f] for f in FIELDS) for c in page["results"]] == expected and expected


@pytest.mark.parametrize("cell_units", [1, 3, 7, 1000])
def test_any_threshold_counts_exactly_whatever_the_cells(zoo, user, other_user, carol, monkeypatch, cell_units):
    """Cells of 1, 3, 7 units (every zoo IoU a bound; runs of tied IoUs such as the many 0.04s
    across bounds) and of 1000 (one cell per scope): at the thresholds around stored IoUs, on
    each cell's bound and either side of it, at each model's best, below and above every unit,
    the cells count what the units count. Three more public models share one bucket, with IoUs
    on a 0.01 grid (long runs of ties), so that a concept's models spread over many cells."""
    from django.db.models import Max

    from api import selectors, services
    from api.models import SCOPE_BUCKETS, Concept, ConceptIouCell, Job, NetworkModel, Unit
    from api.services import concept_cells

    rng = np.random.default_rng(100 + cell_units)
    concepts = list(Concept.objects.order_by("id"))
    first = zoo["bob-public"]
    for i in (1, 2, 3):
        model = NetworkModel.objects.create(
            pk=first.pk + 1000 * i * SCOPE_BUCKETS,
            owner=other_user,
            name=f"tied{i}",
            arch="builtin:scenecnn",
            weights_path="/x",
            public=True,
        )
        job = Job.objects.create(
            owner=other_user, type="dissect", model=model, dataset=first.jobs.first().dataset, status="succeeded"
        )
        Unit.objects.bulk_create(
            Unit(
                job=job,
                model=model,
                layer="layer0",
                unit=u,
                label=concepts[u % len(concepts)],
                label_name=concepts[u % len(concepts)].name,
                iou=round(float(rng.uniform(0.0, 0.2)), 2),
                threshold=1.0,
                stability=[0.9, 0.5][u % 2],
                p_value=[0.01, 0.3][u % 3 == 0],
            )
            for u in range(60)
        )
    monkeypatch.setattr(concept_cells, "IOU_CELL_UNITS", cell_units)
    services.concept_scopes_rebuild()
    cells = ConceptIouCell.objects.filter(bar="all", scope_owner__isnull=True)
    if cell_units == 1000:
        assert set(cells.values_list("lo", flat=True)) == {float("-inf")}
    else:  # many cells; no unit lost or counted twice
        assert cells.count() > 10
        public = Unit.objects.filter(job__status="succeeded", label__isnull=False, model__public=True).count()
        assert sum(len(c.unit_ious) for c in cells) == public
    bounds = sorted({lo for lo in ConceptIouCell.objects.values_list("lo", flat=True) if math.isfinite(lo)})
    rng = np.random.default_rng(cell_units)
    sampled = [float(x) for x in rng.choice(bounds, size=min(8, len(bounds)), replace=False)] if bounds else []
    near = [v for lo in sampled for v in (np.nextafter(lo, -1.0), lo, np.nextafter(lo, 2.0))]
    # each model's best IoU per concept: a threshold there splits the models of its cell
    near += sorted(
        set(
            Unit.objects.filter(label__isnull=False)
            .values("model", "label")
            .annotate(best=Max("iou"))
            .values_list("best", flat=True)
        )
    )
    for who in (user, carol):
        for bars in ({}, {"min_stability": 0.9, "max_p_value": 0.01}):
            for t in (*THRESHOLDS, *near):
                live = _rows(selectors.concept_list_live(user=who, min_iou=float(t), **bars))
                assert _rows(selectors.concept_list(user=who, min_iou=float(t), **bars)) == live, (who, bars, t)


def test_the_embedded_database_sums_the_detector_rows(zoo, user, other_user, carol, monkeypatch):
    """Without Postgres the scope rows are summed from ConceptStat (no arrays): the same detector
    counts, and other thresholds count the units."""
    from django.db import connection

    from api import selectors, services
    from api.models import ConceptIouCell, ConceptStatScope

    expected = sorted(
        ConceptStatScope.objects.values_list(
            "bar", "scope_owner_id", "concept_id", "bucket", "units", "model_count", "best_iou"
        ),
        key=str,
    )
    monkeypatch.setattr(connection, "vendor", "sqlite")
    services.concept_scopes_rebuild()
    got = sorted(
        ConceptStatScope.objects.values_list(
            "bar", "scope_owner_id", "concept_id", "bucket", "units", "model_count", "best_iou"
        ),
        key=str,
    )
    assert got == expected and not ConceptIouCell.objects.exists()
    assert _rows(selectors.concept_list(user=user, min_iou=0.1)) == _rows(
        selectors.concept_list_live(user=user, min_iou=0.1)
    )
    _all_agree(user, other_user, carol)

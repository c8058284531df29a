"""The results store: bulk, idempotent layer writes, and the cross-model reads over them."""

from __future__ import annotations

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

pytestmark = pytest.mark.django_db

CONCEPTS = [
    ("tree", "object"),
    ("sky", "object"),
    ("grass", "object"),
    ("leg", "part"),
    ("wood", "material"),
    ("red-c", "color"),
    ("tree", "part"),
]


@pytest.fixture()
def running_job(user, settings, tmp_path):
    from api.models import Dataset, Job, NetworkModel

    settings.MEDIA_ROOT = tmp_path / "media"
    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x")
    dataset = Dataset.objects.create(owner=user, name="d", format="broden", path="/y")
    return Job.objects.create(owner=user, type="dissect", model=model, dataset=dataset, status="running")


def _layer(units: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    iou = rng.uniform(0.0, 0.2, size=(units, len(CONCEPTS)))
    iou[0] = 0.0
    iou[1, :] = 0.05
    return iou, rng.uniform(0.5, 2.0, size=units), rng.integers(0, 50, size=(units, 5)).tolist()


def _store(job, iou, thresholds, top_images, layer="conv5"):
    from api import services

    return services.layer_result_store(
        job=job,
        layer=layer,
        thresholds=thresholds,
        iou=iou,
        concepts=CONCEPTS,
        summary={"units": len(iou)},
        top_images=top_images,
    )


def _check_rows(job, iou, thresholds, top_images, layer="conv5", k=5):
    from api.models import LayerResult, Unit, UnitConcept

    units = list(Unit.objects.filter(job=job, layer=layer).select_related("label").order_by("unit"))
    assert [u.unit for u in units] == list(range(len(iou)))
    order = np.argsort(-iou, axis=1, kind="stable")[:, :k]
    for u, row in zip(units, order, strict=True):
        assert u.threshold == pytest.approx(thresholds[u.unit])
        assert u.top_images == top_images[u.unit]
        if iou[u.unit].max() > 0:
            assert (u.label.name, u.label.category) == CONCEPTS[row[0]]
            assert u.label_name == u.label.name
            assert u.iou == pytest.approx(iou[u.unit, row[0]])
        else:
            assert u.label is None and u.label_name == "" and u.iou == 0.0
        scores = list(UnitConcept.objects.filter(unit=u).select_related("concept").order_by("rank"))
        assert [(s.concept.name, s.concept.category) for s in scores] == [CONCEPTS[c] for c in row]
        assert [s.iou for s in scores] == pytest.approx(iou[u.unit, row].tolist())
    assert UnitConcept.objects.filter(unit__job=job, unit__layer=layer).count() == len(iou) * k
    assert LayerResult.objects.filter(job=job, layer=layer).count() == 1


def test_a_layer_is_written_in_bulk_and_a_redelivery_replaces_it(running_job, settings):
    from pathlib import Path

    iou, thresholds, top_images = _layer()
    with CaptureQueriesContext(connection) as first:
        assert _store(running_job, iou, thresholds, top_images) == len(iou)
    _check_rows(running_job, iou, thresholds, top_images)
    assert len(first.captured_queries) < 15, [q["sql"][:80] for q in first.captured_queries]
    iou2, thresholds2, top2 = _layer(seed=1)
    assert _store(running_job, iou2, thresholds2, top2) == len(iou2)
    _check_rows(running_job, iou2, thresholds2, top2)
    path = Path(settings.MEDIA_ROOT) / "results" / f"job-{running_job.pk}" / "conv5.npz"
    with np.load(path) as data:
        assert np.allclose(data["iou"], iou2.astype(np.float32))
        assert list(data["concept_names"]) == [n for n, _ in CONCEPTS]
    assert [p.name for p in path.parent.iterdir()] == ["conv5.npz"]


def test_the_bulk_create_fallback_writes_the_same_rows(running_job, monkeypatch):
    monkeypatch.setattr(connection, "vendor", "sqlite")
    iou, thresholds, top_images = _layer(seed=2)
    assert _store(running_job, iou, thresholds, top_images) == len(iou)
    assert _store(running_job, iou, thresholds, top_images) == len(iou)
    _check_rows(running_job, iou, thresholds, top_images)


def test_layers_are_independent_and_odd_layer_names_survive(running_job):
    from api.models import Unit

    iou, thresholds, top_images = _layer()
    _store(running_job, iou, thresholds, top_images, layer="features\t1\\x")
    _store(running_job, iou[:5], thresholds[:5], top_images[:5], layer="layer4.1")
    _check_rows(running_job, iou, thresholds, top_images, layer="features\t1\\x")
    _check_rows(running_job, iou[:5], thresholds[:5], top_images[:5], layer="layer4.1")
    assert Unit.objects.filter(job=running_job).count() == len(iou) + 5


def test_fewer_concepts_than_k_and_no_top_images(running_job, settings):
    from api import services
    from api.models import Unit, UnitConcept

    settings.UNIT_TOP_CONCEPTS = 5
    iou = np.array([[0.1, 0.3], [0.0, 0.0]])
    stored = services.layer_result_store(
        job=running_job, layer="c", thresholds=np.ones(2), iou=iou, concepts=CONCEPTS[:2], summary={}
    )
    assert stored == 2
    assert UnitConcept.objects.filter(unit__job=running_job).count() == 4
    assert list(Unit.objects.filter(job=running_job).order_by("unit").values_list("top_images", flat=True)) == [[], []]


def test_a_job_no_longer_running_gets_no_rows(running_job):
    from api.models import LayerResult, Unit

    running_job.status = "cancelled"
    running_job.save()
    iou, thresholds, top_images = _layer()
    assert _store(running_job, iou, thresholds, top_images) == 0
    assert not Unit.objects.filter(job=running_job).exists()
    assert not LayerResult.objects.exists()


@pytest.fixture()
def stored(running_job):
    from api import services

    iou, thresholds, top_images = _layer(units=30)
    _store(running_job, iou, thresholds, top_images)
    services.job_succeed(job_id=running_job.pk)
    running_job.refresh_from_db()
    return running_job, iou


def test_units_by_concept_name_cover_every_category_and_read_a_fixed_number_of_queries(api, stored):
    _, iou = stored
    labels = [CONCEPTS[c] for c in iou.argmax(axis=1)]
    tree_units = sum(1 for (name, _), row in zip(labels, iou, strict=True) if name == "tree" and row.max() >= 0.04)
    with CaptureQueriesContext(connection) as small:
        page = api.get("/api/units/?concept=tree&min_iou=0.04&page_size=2").json()
    with CaptureQueriesContext(connection) as large:
        everything = api.get("/api/units/?concept=tree&min_iou=0.04&page_size=1000").json()["results"]
    assert len(small.captured_queries) == len(large.captured_queries)
    assert len(everything) == tree_units > 0
    assert {u["label"] for u in everything} == {"tree"}
    assert [u["iou"] for u in everything] == sorted((u["iou"] for u in everything), reverse=True)
    assert all(len(u["top_concepts"]) == 5 and u["top_concepts"][0]["rank"] == 0 for u in everything)
    assert page["next"] and len(page["results"]) == 2
    assert api.get("/api/units/?concept=nothing-like-it").json()["results"] == []
    part = api.get("/api/units/?concept=tree&category=part&page_size=1000").json()["results"]
    assert {u["category"] for u in part} <= {"part"}


def test_model_layer_listing_and_layer_summary(api, stored):
    job, iou = stored
    units = api.get(f"/api/units/?model={job.model_id}&layer=conv5&page_size=1000").json()["results"]
    assert len(units) == len(iou)
    layers = api.get(f"/api/models/{job.model_id}/layers/").json()
    assert [row["layer"] for row in layers] == ["conv5"]


def test_concept_counts(api, other_api, stored):
    _, iou = stored
    expected: dict[str, int] = {}
    for row in iou:
        if row.max() >= 0.04:
            name = CONCEPTS[int(row.argmax())][0]
            expected[name] = expected.get(name, 0) + 1
    listed = api.get("/api/concepts/?page_size=100").json()["results"]
    assert {c["name"]: c["units"] for c in listed} == expected
    assert all(c["models"] == 1 for c in listed)
    assert [c["units"] for c in listed] == sorted((c["units"] for c in listed), reverse=True)
    strict = api.get("/api/concepts/?min_iou=0.15").json()["results"]
    assert sum(c["units"] for c in strict) == int((iou.max(axis=1) >= 0.15).sum())
    assert other_api.get("/api/concepts/").json()["results"] == []

"""Dashboard pages with Django's test client: what they show, to whom, escaped, and how fast."""

from __future__ import annotations

import re
import time

import pytest

pytestmark = pytest.mark.django_db

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
CONCEPTS = [("tree", "object"), ("sky", "object"), ("wheel", "part"), ("brick", "material"), ("red-c", "color")]


def make_dissection(
    owner, *, units: int = 8, layer: str = "conv5", name: str = "net", public: bool = False, status: str = "succeeded"
):
    """A model, a dataset and a job with one dissected layer, written directly as rows."""
    from api.models import (
        Concept,
        Dataset,
        Job,
        LayerResult,
        NetworkModel,
        Unit,
        UnitConcept,
    )

    model = NetworkModel.objects.create(
        owner=owner,
        name=name,
        arch="builtin:scenecnn",
        weights_path="/x",
        public=public,
        layers=[
            {"name": "conv4", "type": "Conv2d", "units": units, "height": 8, "width": 8},
            {"name": layer, "type": "Conv2d", "units": units, "height": 4, "width": 4},
        ],
    )
    dataset = Dataset.objects.create(owner=owner, name=f"{name}-data", format="broden", path="/y", public=public)
    job = Job.objects.create(
        owner=owner,
        type="dissect",
        model=model,
        dataset=dataset,
        status=status,
        params={"layers": [layer], "quantile": 0.99, "batch_size": 32},
    )
    concepts = [Concept.objects.get_or_create(name=n, category=c)[0] for n, c in CONCEPTS]
    rows = Unit.objects.bulk_create(
        [
            Unit(
                job=job,
                model=model,
                layer=layer,
                unit=u,
                label=concepts[u % len(concepts)],
                label_name=concepts[u % len(concepts)].name,
                iou=0.01 + 0.2 * ((u * 37) % units) / units,
                threshold=1.0,
                top_images=[0, 1, 2, 3, 4],
            )
            for u in range(units)
        ]
    )
    UnitConcept.objects.bulk_create(
        [
            UnitConcept(unit=row, concept=concepts[(row.unit + r) % len(concepts)], rank=r, iou=row.iou / (r + 1))
            for row in rows
            for r in range(3)
        ]
    )
    labels = [concepts[u % len(concepts)] for u in range(units)]
    LayerResult.objects.create(
        job=job,
        layer=layer,
        units=units,
        summary={
            "layer": layer,
            "units": units,
            "min_iou": 0.04,
            "detectors": units,
            "unique_concepts": len(CONCEPTS),
            "detectors_by_category": {"object": 2, "part": 1},
            "unique_concepts_by_category": {"object": 2, "part": 1},
            "concept_units": {c.name: labels.count(c) for c in concepts},
        },
    )
    from api import services

    services.concept_stats_refresh(model_id=model.pk)  # what job_succeed does: the concept summaries
    return {"model": model, "dataset": dataset, "job": job, "unit": rows[0], "layer": layer}


@pytest.fixture()
def alice(client, user):
    client.force_login(user)
    return client


def test_pages_need_login(client):
    for url in ("/", "/models/", "/datasets/", "/search/?concept=tree", "/jobs/new/", "/models/new/", "/token/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url


def test_every_page_renders_with_the_nav(alice, user):
    rows = make_dissection(user)
    job, unit, model = rows["job"], rows["unit"], rows["model"]
    urls = [
        "/",
        "/jobs/live/",
        "/jobs/new/",
        f"/jobs/{job.pk}/",
        f"/jobs/{job.pk}/layers/conv5/",
        "/models/",
        "/models/new/",
        f"/models/{model.pk}/",
        "/datasets/",
        "/datasets/new/",
        f"/units/{unit.pk}/",
        "/search/",
        "/search/?concept=TREE",
        "/token/",
    ]
    for url in urls:
        response = alice.get(url)
        assert response.status_code == 200, url
        if url != "/jobs/live/":
            for link in (
                "/jobs/new/",
                "/models/",
                "/models/new/",
                "/datasets/",
                "/datasets/new/",
                "/search/",
                "/token/",
            ):
                assert f'href="{link}"' in response.content.decode(), (url, link)


def test_job_page_shows_layers_as_a_table_and_the_full_error(alice, user):
    rows = make_dissection(user)
    page = alice.get(f"/jobs/{rows['job'].pk}/").content.decode()
    assert "<th>layer</th>" in page and f'href="/jobs/{rows["job"].pk}/layers/conv5/"' in page
    assert "concept_units" not in page and "{" not in re.sub(r"<script.*?</script>", "", page, flags=re.DOTALL)
    failed = make_dissection(user, name="broken", status="failed")["job"]
    failed.error = "Traceback line 1\n" + "x" * 5000 + "\nthe last line of the reason"
    failed.save()
    page = alice.get(f"/jobs/{failed.pk}/").content.decode()
    assert "the last line of the reason" in page and "x" * 5000 in page
    assert "Re-run" in page and "Cancel job" not in page
    ablate = make_dissection(user, name="ablated")["job"]
    ablate.type, ablate.params, ablate.summary = "ablate", {"layer": "conv5"}, {"classes": ["beach"]}
    ablate.save()
    ablate.layer_results.all().delete()
    page = alice.get(f"/jobs/{ablate.pk}/").content.decode()
    assert f"/api/jobs/{ablate.pk}/ablation/" in page and "no layer results" not in page


def test_cancel_and_rerun_go_through_the_services(alice, user, monkeypatch):
    from api.models import Job
    from api.services import queue

    enqueued = []
    monkeypatch.setattr(queue, "job_enqueue", enqueued.append)
    rows = make_dissection(user, status="running")
    job = rows["job"]
    assert "Cancel job" in alice.get(f"/jobs/{job.pk}/").content.decode()
    response = alice.post(f"/jobs/{job.pk}/cancel/", follow=True)
    assert Job.objects.get(pk=job.pk).status == "cancelled"
    assert f"Job {job.pk} cancelled." in response.content.decode()
    again = alice.post(f"/jobs/{job.pk}/cancel/", follow=True).content.decode()
    assert "already cancelled" in again
    response = alice.post(f"/jobs/{job.pk}/rerun/")
    new = Job.objects.exclude(pk=job.pk).get(model=rows["model"])
    assert response.status_code == 302 and response["Location"] == f"/jobs/{new.pk}/"
    assert (new.type, new.dataset_id, new.status) == ("dissect", job.dataset_id, "queued")
    # the same params, plus the defaults of any the job predates (the label evidence's)
    assert new.params == {"evidence_blocks": 16, "resamples": 1000, "evidence_seed": 0, **job.params}
    assert alice.get(f"/jobs/{job.pk}/cancel/").status_code == 405


def test_job_form_shows_the_service_error(alice, user, monkeypatch):
    from api.models import Job
    from api.services import queue

    monkeypatch.setattr(queue, "job_enqueue", lambda pk: None)
    rows = make_dissection(user)
    form = {"model": rows["model"].pk, "dataset": rows["dataset"].pk, "layers": "conv5, nope", "quantile": "0.99"}
    page = alice.post("/jobs/new/", form).content.decode()
    assert "unknown layer(s) nope for model net" in page and "valid: conv4, conv5" in page
    assert Job.objects.count() == 1
    response = alice.post("/jobs/new/", {**form, "layers": "conv4 conv5", "quantile": "0.995"})
    job = Job.objects.latest("id")
    assert response["Location"] == f"/jobs/{job.pk}/"
    assert job.params["layers"] == ["conv4", "conv5"] and job.params["quantile"] == 0.995


def test_model_form_errors_are_shown_escaped(alice, data_root):
    page = alice.post(
        "/models/new/",
        {"name": EVIL, "arch": "builtin:scenecnn", "kind": "classifier", "weights_path": f"/elsewhere/{EVIL}.pt"},
    ).content.decode()
    assert "Not saved" in page and "is outside the configured data roots" in page
    assert EVIL not in page and EVIL_ESCAPED in page
    page = alice.post("/models/new/", {"name": "m", "arch": "resnet", "kind": "classifier"}).content.decode()
    assert "arch must be" in page and "exactly one of a weights file or a weights path" in page
    page = alice.post(
        "/datasets/new/", {"name": "d", "format": "broden", "concepts": "masks", "path": str(data_root / "missing")}
    ).content.decode()
    assert "path does not exist" in page


def test_user_text_is_escaped_everywhere(alice, user):
    from api.models import Concept, Unit

    rows = make_dissection(user, name=EVIL)
    evil_concept = Concept.objects.create(name=EVIL, category=EVIL)
    Unit.objects.filter(pk=rows["unit"].pk).update(label=evil_concept, label_name=EVIL, iou=0.5)
    from api import services

    services.concept_stats_refresh(model_id=rows["model"].pk)  # the rows changed around the services
    job, model, unit = rows["job"], rows["model"], rows["unit"]
    urls = [
        "/",
        "/jobs/live/",
        f"/jobs/{job.pk}/",
        f"/models/{model.pk}/",
        "/models/",
        "/datasets/",
        f"/jobs/{job.pk}/layers/conv5/",
        f"/units/{unit.pk}/",
        "/search/?concept=" + EVIL,
        "/search/?concept=scr",
        "/jobs/new/",
    ]
    for url in urls:
        page = alice.get(url).content.decode()
        assert EVIL not in page, url
        assert EVIL_ESCAPED in page or "\\u003Cscript\\u003E" in page, url
        scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.DOTALL)
        assert all("alert(1)" not in body for body in scripts), url


def test_other_users_pages_are_404(client, user, other_user):
    rows = make_dissection(user)
    job, model, unit = rows["job"], rows["model"], rows["unit"]
    client.force_login(other_user)
    for url in (f"/jobs/{job.pk}/", f"/models/{model.pk}/", f"/units/{unit.pk}/", f"/jobs/{job.pk}/layers/conv5/"):
        assert client.get(url).status_code == 404, url
    for url in (f"/jobs/{job.pk}/cancel/", f"/jobs/{job.pk}/rerun/"):
        assert client.post(url).status_code == 404, url
    for url in ("/", "/jobs/live/", "/models/", "/datasets/", "/search/?concept=tree", "/search/", "/jobs/new/"):
        page = client.get(url).content.decode()
        assert "net-data" not in page and f'href="/jobs/{job.pk}/"' not in page and f"/units/{unit.pk}/" not in page, (
            url
        )
    public = make_dissection(user, name="shared", public=True)
    assert client.get(f"/models/{public['model'].pk}/").status_code == 200
    assert client.get(f"/units/{public['unit'].pk}/").status_code == 200
    assert "Cancel job" not in client.get(f"/jobs/{public['job'].pk}/").content.decode()


def test_gallery_filters_and_sorts_on_the_server(alice, user):
    rows = make_dissection(user, units=40)
    url = f"/jobs/{rows['job'].pk}/layers/conv5/"

    def cards(query):
        page = alice.get(url + query).content.decode()
        return [int(n) for n in re.findall(r'data-unit="(\d+)"', page)], page

    units, _ = cards("")
    assert len(units) == 40
    ious = {u.unit: u.iou for u in rows["job"].units.all()}
    assert units == sorted(ious, key=lambda u: (-ious[u], u))
    trees, page = cards("?concept=tree")
    assert trees and all(u % len(CONCEPTS) == 0 for u in trees)
    parts, _ = cards("?category=part&sort=unit")
    assert parts == sorted(u for u in ious if u % len(CONCEPTS) == 2)
    strong, _ = cards("?min_iou=0.1&sort=iou")
    assert strong == sorted((u for u in ious if ious[u] >= 0.1), key=lambda u: (ious[u], u))
    assert cards("?min_iou=junk&sort=junk")[0] == units
    assert 'loading="lazy"' in page and "/api/units/" in page


def test_model_page_draws_the_figure_1_charts(alice, user):
    rows = make_dissection(user, units=30)
    page = alice.get(f"/models/{rows['model'].pk}/").content.decode()
    assert page.count("<svg") == 2
    assert "Unique concepts per layer" in page and "Detectors per category" in page
    assert "<title>tree (object):" in page and "#4e79a7" in page
    assert "<td>8 × 8</td>" in page and "<td>4 × 4</td>" in page


def test_search_ranks_units_of_every_visible_model(alice, user, other_user):
    mine = make_dissection(user, units=20, name="mine")
    shared = make_dissection(other_user, units=20, name="theirs", public=True)
    hidden = make_dissection(other_user, units=20, name="hidden")
    page = alice.get("/search/?concept=Tree").content.decode()
    ids = [int(n) for n in re.findall(r'href="/units/(\d+)/"', page)]
    from api.models import Unit

    found = list(Unit.objects.filter(pk__in=ids))
    assert {u.job_id for u in found} == {mine["job"].pk, shared["job"].pk}
    assert hidden["job"].pk not in {u.job_id for u in found}
    by_id = {u.pk: u.iou for u in found}
    assert [by_id[i] for i in ids] == sorted(by_id.values(), reverse=True)
    assert all(u.label_name == "tree" for u in found)
    assert "8 units labelled" in page
    suggestions = alice.get("/search/?concept=re").content.decode()
    assert 'href="?concept=tree"' in suggestions and 'href="?concept=red-c"' in suggestions
    assert 'href="?concept=sky"' not in suggestions


def test_a_500_unit_layer_renders_in_under_a_second(alice, user):
    rows = make_dissection(user, units=500)
    job = rows["job"]
    alice.get(f"/jobs/{job.pk}/layers/conv5/")
    timings = {}
    for url in (
        f"/jobs/{job.pk}/layers/conv5/",
        f"/jobs/{job.pk}/layers/conv5/?category=object&sort=unit",
        f"/jobs/{job.pk}/",
        f"/models/{rows['model'].pk}/",
        "/search/?concept=tree",
        f"/units/{rows['unit'].pk}/",
    ):
        start = time.perf_counter()
        response = alice.get(url)
        timings[url] = time.perf_counter() - start
        assert response.status_code == 200
    assert max(timings.values()) < 1.0, timings
    page = alice.get(f"/jobs/{job.pk}/layers/conv5/").content.decode()
    assert "500 units" in page and page.count('loading="lazy"') == 256 and "page 1 of 2" in page


def test_ablate_and_attack_jobs_show_the_figure_2_and_5_views(alice, user):
    from api.models import AblationCurve, ClassUnitImportance, Job

    base = make_dissection(user, units=4, layer="conv5")
    classes = ["street", EVIL]
    ablate = Job.objects.create(
        owner=user,
        type="ablate",
        model=base["model"],
        dataset=base["dataset"],
        status="succeeded",
        params={"layer": "conv5"},
        summary={
            "layer": "conv5",
            "classes": classes,
            "train_images": 10,
            "val_images": 5,
            "tied_units": [2, 1],
            "interpretability": {
                "dissection_job": base["job"].pk,
                "units": [0, 1, 2, 3],
                "classes_in_top4": [2, 1, 0, 1],
                "iou": [0.2, 0.1, 0.0, 0.05],
                "correlation": 0.9,
            },
        },
    )
    for c, name in enumerate(classes):
        for k, (removed, kept) in {1: (0.8, 0.6), 2: (0.5, 0.9)}.items():
            AblationCurve.objects.create(
                job=ablate,
                class_index=c,
                class_name=name,
                k=k,
                baseline=0.9,
                removed_top=removed,
                kept_top=kept,
                removed_top_accuracy=0.5,
                kept_top_accuracy=0.6,
            )
        for rank, unit in enumerate([1, 0, 3, 2]):
            ClassUnitImportance.objects.create(
                job=ablate,
                model=base["model"],
                layer="conv5",
                class_index=c,
                class_name=name,
                rank=rank,
                unit=unit,
                balanced_accuracy=0.5 + rank / 10,
                drop=0.4 - rank / 10,
                margin_drop=1.0,
            )
    page = alice.get(f"/jobs/{ablate.pk}/?class=street").content.decode()
    assert page.count("<polyline") == 4
    assert "Figure 2e" in page and page.count("<circle") >= 4 + 2 * 2 * 2
    assert EVIL_ESCAPED in page and EVIL not in page
    important = re.findall(r"<tr><td class=\"num\">(\d+)</td><td class=\"num\">(\d+)</td>", page)
    assert [u for _, u in important[:4]] == ["1", "0", "3", "2"]

    attack = Job.objects.create(
        owner=user,
        type="attack",
        model=base["model"],
        dataset=base["dataset"],
        status="succeeded",
        params={"layer": "conv5", "ablation_job": ablate.pk},
        summary={
            "layer": "conv5",
            "ablation_job": ablate.pk,
            "eps": 0.03,
            "success_rate": 0.75,
            "attacked": 8,
            "images": 6,
            "confidence": 0.99,
            "source": {"mean": 0.9, "low": 0.8, "high": 1.0},
            "target": {"mean": 0.7, "low": 0.6, "high": 0.8},
            "other": {"mean": 0.3, "low": 0.2, "high": 0.4},
        },
    )
    page = alice.get(f"/jobs/{attack.pk}/").content.decode()
    assert "Figure 5c" in page and "0.750 succeeded" in page and "0.900" in page


def test_unit_classifier_jobs_show_the_figure_1f_plot(alice, user):
    from api.models import Job

    base = make_dissection(user, units=4)
    job = Job.objects.create(
        owner=user,
        type="unit_classifier",
        model=base["model"],
        dataset=base["dataset"],
        status="succeeded",
        params={"layer": "conv5", "unit": 2, "concept": EVIL},
        summary={
            "layer": "conv5",
            "unit": 2,
            "concept": EVIL,
            "threshold": 1.5,
            "balanced_accuracy": 0.856,
            "true_positive_rate": 0.9,
            "true_negative_rate": 0.812,
            "images_with": 3,
            "images_without": 2,
            "peaks_with": [1.6, 2.0, 3.0],
            "peaks_without": [0.1, 1.0],
        },
    )
    page = alice.get(f"/jobs/{job.pk}/").content.decode()
    assert "Figure 1f" in page and "0.856" in page
    assert page.count("<circle") == 5
    assert EVIL_ESCAPED in page and EVIL not in page


def test_model_page_lists_layouts_and_picks_layers_for_a_job(alice, user):
    """Every layer with its layout (tokens with the excluded class token, vectors), the layers that
    cannot be dissected and why, and ticked layers carried into the job form."""
    from api.models import NetworkModel

    layers = [
        {
            "name": "blocks.6",
            "type": "Block",
            "units": 384,
            "height": 14,
            "width": 14,
            "kind": "tokens",
            "prefix": ["class"],
            "element": None,
            "description": "tokens on a 14 x 14 patch grid (class token excluded)",
        },
        {
            "name": "head",
            "type": "Linear",
            "units": 10,
            "height": 1,
            "width": 1,
            "kind": "vector",
            "prefix": [],
            "element": None,
            "description": "vector (one value per image)",
        },
    ]
    model = NetworkModel.objects.create(
        owner=user,
        name="vit",
        arch="timm:vit_small_patch16_224",
        weights_path="/x",
        layers=layers,
        layer_problems={"blocks.0.attn.q_norm": "per-head attention values: it cannot be laid out as unit maps"},
    )
    page = alice.get(f"/models/{model.pk}/").content.decode()
    assert "tokens on a 14 x 14 patch grid (class token excluded)" in page and "vector (one value per image)" in page
    assert 'name="layers" value="blocks.6"' in page and "1 layer cannot be dissected" in page
    assert "per-head attention values" in page
    form = alice.get(f"/jobs/new/?model={model.pk}&layers=blocks.6&layers=head").content.decode()
    assert 'value="blocks.6, head"' in form

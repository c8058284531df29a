"""Generator pages with Django's test client, from rows written directly: removal (Figure 4a-b) and
insertion (Figure 4d) job pages, the painting page (Figure 6), the job form's types, and jobs
without a dataset everywhere a dataset used to be shown."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
COLOURS = ["red-c", "green-c", "blue-c", "white-c", "black-c"]
LAYERS = [
    {"name": "layer1", "type": "ConvTranspose2d", "units": 64, "height": 4, "width": 4},
    {"name": "layer2", "type": "ConvTranspose2d", "units": 32, "height": 8, "width": 8},
    {"name": "layer3", "type": "ConvTranspose2d", "units": 16, "height": 16, "width": 16},
]


def _png(path, size=(66, 34)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def make_generator(owner, tmp_path, *, name="dcgan", units=16, concepts=None, public=False, layer="layer2", samples=48):
    """A generator, a succeeded dissection of one layer (units, layer result, IoU matrix file)."""
    from api.models import Concept, Job, LayerResult, NetworkModel, Unit

    concepts = concepts or COLOURS
    layers = [dict(entry, units=units) if entry["name"] == layer else entry for entry in LAYERS]
    model = NetworkModel.objects.create(
        owner=owner,
        name=name,
        arch="builtin:dcgan",
        kind="generator",
        weights_path="/x",
        latent_dim=16,
        output_range=[-1.0, 1.0],
        input_size=64,
        layers=layers,
        public=public,
    )
    job = Job.objects.create(
        owner=owner,
        type="dissect",
        model=model,
        dataset=None,
        status="succeeded",
        progress=1.0,
        params={
            "layers": [layer],
            "quantile": 0.99,
            "batch_size": 32,
            "samples": samples,
            "seed": 0,
            "concepts": "colors",
        },
    )
    rows = [Concept.objects.get_or_create(name=n, category="color")[0] for n in concepts]
    # Unit u is labelled concepts[u % 3] or, every 4th unit, the first concept: the first concept has most units.
    labels = [rows[0] if u % 4 == 0 else rows[u % min(3, len(rows))] for u in range(units)]
    units_rows = Unit.objects.bulk_create(
        [
            Unit(
                job=job,
                model=model,
                layer=layer,
                unit=u,
                label=labels[u],
                label_name=labels[u].name,
                iou=0.02 + 0.1 * ((u * 7) % units) / units,
                threshold=1.0,
                top_images=[0, 1, 2],
            )
            for u in range(units)
        ]
    )
    matrix = tmp_path / f"job-{job.pk}" / f"{layer}.npz"
    matrix.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        matrix,
        iou=np.zeros((units, len(concepts)), np.float32),
        concept_names=np.array(concepts),
        concept_categories=np.array(["color"] * len(concepts)),
    )
    LayerResult.objects.create(
        job=job,
        layer=layer,
        units=units,
        matrix_path=str(matrix),
        summary={
            "layer": layer,
            "units": units,
            "min_iou": 0.04,
            "detectors": units,
            "unique_concepts": 3,
            "detectors_by_category": {"color": units},
            "unique_concepts_by_category": {"color": 3},
            "concept_units": {c.name: labels.count(c) for c in rows},
        },
    )
    return {"model": model, "job": job, "units": units_rows, "layer": layer, "concepts": concepts}


def make_removal(owner, base, tmp_path, *, concept="red-c", ks=(1, 2, 4, 8), units=None):
    from api.models import Job

    n = units or len(base["units"])
    ranked = [(u * 5) % n for u in range(max(ks))]
    baseline = 0.2
    curve = [{"k": k, "share": baseline * (1 - 0.5 * k / max(ks)), "change": -0.5 * k / max(ks)} for k in ks]
    folder = tmp_path / "removal"
    job = Job.objects.create(
        owner=owner,
        type="generator_remove",
        model=base["model"],
        dataset=None,
        status="succeeded",
        progress=1.0,
        params={
            "layer": base["layer"],
            "concept": concept,
            "dissection": base["job"].pk,
            "concepts": "colors",
            "seed": 1,
            "batch_size": 32,
            "ks": list(ks),
            "samples": 200,
            "sample_images": 8,
        },
        results_path=str(folder),
        summary={
            "concept": concept,
            "layer": base["layer"],
            "units": ranked,
            "unit_iou": [0.3 - 0.001 * i for i in range(len(ranked))],
            "baseline": baseline,
            "samples": 200,
            "curve": curve,
            "images": {"before": "removal-before", "after": "removal-after"},
        },
    )
    _png(folder / "removal-before.png")
    _png(folder / "removal-after.png")
    return job


def make_insertion(owner, base, tmp_path, *, concept="red-c", rows=4, cols=4, k=4, listed=True):
    """An insertion job tested at every 2nd position (grid row r is feature row 2r); listed: the
    summary lists those rows and columns, as the worker writes them."""
    from api.models import Job

    grid = [[round(0.4 * (r * cols + c) / (rows * cols), 4) for c in range(cols)] for r in range(rows)]
    grid[0][1] = None
    grid[2][3] = 0.5
    folder = tmp_path / "insertion"
    job = Job.objects.create(
        owner=owner,
        type="generator_insert",
        model=base["model"],
        dataset=None,
        status="succeeded",
        progress=1.0,
        params={
            "layer": base["layer"],
            "concept": concept,
            "dissection": base["job"].pk,
            "concepts": "colors",
            "seed": 1,
            "batch_size": 32,
            "k": k,
            "quantile": 0.995,
            "samples": 32,
            "stride": 2,
            "size": 1,
        },
        results_path=str(folder),
        summary={
            "concept": concept,
            "layer": base["layer"],
            "units": list(range(k)),
            "unit_iou": [0.2] * k,
            "values": [3.5 + i for i in range(k)],
            "map": grid,
            "positions": {
                "stride": 2,
                "size": 1,
                "height": rows * 2,
                "width": cols * 2,
                **({"rows": [2 * r for r in range(rows)], "cols": [2 * c for c in range(cols)]} if listed else {}),
            },
            "mean_added": 0.07,
            "best": {"y": 4, "x": 6, "added": 0.5},
            "images": {"before": "insert-before", "after": "insert-after"},
        },
    )
    _png(folder / "insert-before.png")
    _png(folder / "insert-after.png")
    return job


@pytest.fixture()
def alice(client, user):
    client.force_login(user)
    return client


def test_generator_jobs_show_where_their_images_come_from(alice, user, tmp_path):
    from api.models import Job, NetworkModel

    base = make_generator(user, tmp_path)
    job, model = base["job"], base["model"]
    segmenter = NetworkModel.objects.create(
        owner=user,
        name="segnet " + EVIL,
        arch="builtin:segnet",
        kind="segmenter",
        weights_path="/s",
        classes=["-", "blob", "spot"],
        categories=["-", "object", "part"],
        layers=[],
    )
    seg_job = Job.objects.create(
        owner=user,
        type="dissect",
        model=model,
        dataset=None,
        status="queued",
        params={"layers": ["layer1"], "samples": 16, "concepts": segmenter.pk},
    )
    text = "generated: 48 samples, concepts: colours"
    for url in ("/", "/jobs/live/", f"/jobs/{job.pk}/", f"/models/{model.pk}/", f"/jobs/{job.pk}/layers/layer2/"):
        response = alice.get(url)
        assert response.status_code == 200, url
        assert text in response.content.decode(), url
    assert ">48 generated, colours</td>" in alice.get("/jobs/live/").content.decode()
    for url in ("/", f"/jobs/{seg_job.pk}/", f"/models/{model.pk}/"):
        page = alice.get(url).content.decode()
        assert "generated: 16 samples, concepts: segmenter segnet " + EVIL_ESCAPED in page, url
        assert EVIL not in page
    page = alice.get(f"/units/{base['units'][0].pk}/").content.decode()
    assert "sample indices of the generated images" in page
    assert f'href="/models/{model.pk}/paint/?layer=layer2&amp;concept=red-c"' in page
    page = alice.get(f"/jobs/{job.pk}/").content.decode()
    assert f'href="/models/{model.pk}/paint/?layer=layer2"' in page and "<th>layer</th>" in page

    models = alice.get("/models/").content.decode()
    assert "latent 16" in models and f'href="/models/{model.pk}/paint/"' in models
    facts = alice.get(f"/models/{model.pk}/").content.decode()
    assert "<strong>generator</strong>" in facts and "latent of 16 numbers" in facts and "[-1.0, 1.0]" in facts
    assert "input 64 px" not in facts and "Remove a concept" in facts
    seg_page = alice.get(f"/models/{segmenter.pk}/").content.decode()
    assert "<strong>segmenter</strong>" in seg_page and "3 labels" in seg_page
    assert "1 · blob</span>" in seg_page and 'title="part">2 · spot' in seg_page


def test_removal_job_page_draws_the_curve_table_units_and_images(alice, user, tmp_path):
    base = make_generator(user, tmp_path)
    job = make_removal(user, base, tmp_path)
    page = alice.get(f"/jobs/{job.pk}/").content.decode()
    assert "Figure 4a" in page and "Figure 4b" in page
    chart = re.search(r'<svg class="chart" id="removal-chart".*?</svg>', page, flags=re.DOTALL).group(0)
    assert chart.count("<polyline") == 1 and chart.count("<circle") == 5  # k = 0 (the baseline) and 4 ks
    assert "no removal: 20.0%" in chart and "<title>8 units removed: 10.0% (-50.0%)</title>" in chart
    points = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', chart).group(1).split()]
    assert [x for x, _ in points] == sorted(x for x, _ in points) and points[0][1] < points[-1][1]
    table = re.search(r'<table class="data" id="removal-table">.*?</table>', page, flags=re.DOTALL).group(0)
    cells = re.findall(r'<td class="num[^"]*">([^<]+)</td>', table)
    assert cells[:3] == ["0", "20.0%", "baseline"] and cells[-3:] == ["8", "10.0%", "-50.0%"]
    assert "<strong>50.0% of its pixels are gone</strong>" in page
    linked = {u.unit: u.pk for u in base["units"]}
    ranked = job.summary["units"]
    for unit in ranked:
        assert f'<a href="/units/{linked[unit]}/">{unit}</a>' in page
    assert f'href="/jobs/{base["job"].pk}/"' in page
    for name in ("removal-before", "removal-after"):
        src = re.search(rf'src="(/api/jobs/{job.pk}/images/{name}[./a-z]*)"', page).group(1)
        image = alice.get(src)
        assert image.status_code == 200 and image["Content-Type"] == "image/png"
    assert f'href="/models/{base["model"].pk}/paint/?layer=layer2&amp;concept=red-c"' in page


def test_removal_page_without_unit_rows_or_images_and_with_the_cores_field_names(alice, user, tmp_path):
    """Units of a dissection the user cannot see are not linked; a summary in the core's own names
    (ks, fractions, relative_change, count) is drawn the same."""
    from api.models import Job

    base = make_generator(user, tmp_path)
    job = Job.objects.create(
        owner=user,
        type="generator_remove",
        model=base["model"],
        dataset=None,
        status="succeeded",
        params={"layer": "layer2", "concept": "red-c", "dissection": 999999, "ks": [1, 2], "samples": 10},
        summary={
            "concept": "red-c",
            "layer": "layer2",
            "units": [3, 1],
            "unit_iou": [0.2, 0.1],
            "baseline": 0.0,
            "ks": [1, 2],
            "fractions": [0.0, 0.0],
            "relative_change": [None, None],
            "count": 10,
            "images": {},
        },
    )
    page = alice.get(f"/jobs/{job.pk}/").content.decode()
    assert page.count("<circle") == 3 and "Figure 4b" not in page and "/units/" not in page
    assert "over 10 generated samples" in page and page.count('<td class="num">–</td>') >= 2


@pytest.mark.parametrize("listed", [True, False])
def test_insertion_job_page_draws_the_map_with_legend_and_best_position(alice, user, tmp_path, listed):
    base = make_generator(user, tmp_path)
    job = make_insertion(user, base, tmp_path, listed=listed)
    page = alice.get(f"/jobs/{job.pk}/").content.decode()
    assert "Figure 4d" in page
    svg = re.search(r'<svg class="chart heatmap" id="insertion-map".*?</svg>', page, flags=re.DOTALL).group(0)
    cells = re.findall(
        r'<rect x="(\d+)" y="(\d+)" width="(\d+)" height="\d+" fill="(#[0-9a-f]{6})"><title>([^<]*)</title>', svg
    )
    assert len(cells) == 16
    by_title = {title: fill for *_, fill, title in cells}
    assert by_title["y 4, x 6: added 50.0%"] == "#800026"  # the largest value: the darkest colour
    assert by_title["y 0, x 0: added 0.0%"] == "#ffffcc"
    assert by_title["y 0, x 2: not tested"] == "#e5e7eb"
    best = re.search(r'<rect class="best" x="(\d+)" y="(\d+)"', svg).groups()
    cell = next(c for c in cells if c[4].startswith("y 4, x 6:"))
    assert best == cell[:2]
    assert "<linearGradient" in svg and "pixels newly showing red-c" in svg and ">50.0%</text>" in svg
    assert "on average <strong>7.0%</strong>" in page and "most at y 4, x 6 (50.0%)" in page
    values = re.findall(r'<td class="num">(3\.500|4\.500|5\.500|6\.500)</td>', page)
    assert values == ["3.500", "4.500", "5.500", "6.500"]
    assert f"/api/jobs/{job.pk}/images/insert-before" in page and f"/api/jobs/{job.pk}/images/insert-after" in page
    assert alice.get(re.search(r'src="(/api/jobs/\d+/images/insert-after[^"]*)"', page).group(1)).status_code == 200


def test_unfinished_and_failed_generator_jobs_show_no_results(alice, user, tmp_path):
    base = make_generator(user, tmp_path)
    job = make_removal(user, base, tmp_path)
    job.status, job.error = "failed", "DissectError: no concept"
    job.save()
    page = alice.get(f"/jobs/{job.pk}/").content.decode()
    assert "removal-chart" not in page and "DissectError: no concept" in page


def test_user_strings_are_escaped_on_the_generator_pages(alice, user, tmp_path):
    base = make_generator(user, tmp_path, name=EVIL, concepts=[EVIL, "green-c", "blue-c"])
    removal = make_removal(user, base, tmp_path, concept=EVIL)
    insertion = make_insertion(user, base, tmp_path, concept=EVIL)
    model = base["model"]
    urls = [
        f"/jobs/{removal.pk}/",
        f"/jobs/{insertion.pk}/",
        f"/models/{model.pk}/paint/",
        f"/models/{model.pk}/paint/?concept={EVIL}&layer={EVIL}",
        f"/models/{model.pk}/",
        "/jobs/new/",
        "/models/",
        f"/jobs/new/?model={model.pk}&type=generator_remove&concept={EVIL}",
    ]
    for url in urls:
        page = alice.get(url).content.decode()
        assert EVIL not in page, url
        assert EVIL_ESCAPED in page or "\\u003Cscript\\u003E" in page, url
        code = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
        assert all("alert(1)" not in body for body in code), url
        for body in re.findall(r'<script id="[^"]+" type="application/json">(.*?)</script>', page, flags=re.DOTALL):
            assert "<" not in body, url


def test_paint_page_offers_dissected_layers_and_their_concepts(alice, user, tmp_path):
    from api.models import NetworkModel

    base = make_generator(user, tmp_path, units=12)
    model = base["model"]
    page = alice.get(f"/models/{model.pk}/paint/?layer=layer2&concept=green-c&seed=7").content.decode()
    data = json.loads(re.search(r'<script id="paint-data" type="application/json">(.*?)</script>', page).group(1))
    assert data["model"] == model.pk and data["wanted"] == {
        "layer": "layer2",
        "concept": "green-c",
        "seed": "7",
        "index": "0",
    }
    [layer] = data["layers"]
    assert (layer["name"], layer["height"], layer["width"], layer["units"], layer["dissection"]) == (
        "layer2",
        8,
        8,
        12,
        base["job"].pk,
    )
    labels = [(c["name"], c["units"]) for c in layer["concepts"]]
    assert labels == sorted(labels, key=lambda c: (-c[1], c[0])) and labels[0][0] == "red-c"
    assert sum(n for _, n in labels) == 12
    assert (
        'id="paint-grid"' in page
        and 'id="paint-csrf"' in page
        and data["endpoint"] == f"/api/models/{model.pk}/paint/?as=json"
    )
    assert f'href="/models/{model.pk}/paint/"' in alice.get(f"/models/{model.pk}/").content.decode()

    bare = NetworkModel.objects.create(
        owner=user,
        name="fresh",
        arch="builtin:dcgan",
        kind="generator",
        weights_path="/x",
        latent_dim=16,
        layers=LAYERS,
    )
    page = alice.get(f"/models/{bare.pk}/paint/").content.decode()
    assert "No layer of fresh has a succeeded dissection yet" in page and "paint-data" not in page
    assert "Paint</a>" not in alice.get(f"/models/{bare.pk}/").content.decode()
    classifier = NetworkModel.objects.create(
        owner=user, name="cnn", arch="builtin:scenecnn", weights_path="/x", layers=LAYERS
    )
    assert "Painting needs a generator" in alice.get(f"/models/{classifier.pk}/paint/").content.decode()


def test_other_users_generator_pages_are_404(client, user, other_user, tmp_path):
    base = make_generator(user, tmp_path)
    removal = make_removal(user, base, tmp_path)
    client.force_login(other_user)
    for url in (f"/jobs/{removal.pk}/", f"/models/{base['model'].pk}/paint/", f"/jobs/{base['job'].pk}/"):
        assert client.get(url).status_code == 404, url
    assert client.get(reverse("job-images", kwargs={"pk": removal.pk, "name": "removal-before"})).status_code == 404
    public = make_generator(user, tmp_path / "public", name="shared", public=True)
    page = client.get(f"/models/{public['model'].pk}/paint/").content.decode()
    assert public["job"].pk in [
        layer["dissection"]
        for layer in json.loads(
            re.search(r'<script id="paint-data" type="application/json">(.*?)</script>', page).group(1)
        )["layers"]
    ]


def test_job_form_submits_every_type_and_shows_the_service_errors(alice, user, tmp_path, monkeypatch):
    from api.models import Dataset, Job
    from api.services import queue

    monkeypatch.setattr(queue, "job_enqueue", lambda pk: None)
    base = make_generator(user, tmp_path)
    model = base["model"].pk
    page = alice.get(f"/jobs/new/?model={model}&type=generator_remove").content.decode()
    assert '<option value="generator_remove" selected>' in page and '<option value="generator_insert">' in page
    assert 'id="field-ks"' in page and 'list="layer-names"' in page
    spec = json.loads(re.search(r'<script id="job-form-spec" type="application/json">(.*?)</script>', page).group(1))
    assert spec["models"][str(model)]["kind"] == "generator"
    assert spec["models"][str(model)]["dissected"]["layer2"][0] == "red-c"
    assert spec["types"]["generator_insert"]["generator"][:2] == ["layer", "concept"]

    def post(**fields):
        return alice.post("/jobs/new/", {"model": model, **fields})

    response = post(
        type="dissect",
        layers="layer1 layer2",
        samples="64",
        seed="3",
        concepts="colors",
        quantile="0.99",
        ks="1, 2",
        max_images="5",
    )
    job = Job.objects.latest("id")
    assert response["Location"] == f"/jobs/{job.pk}/", response.content.decode()[-3000:]
    assert job.dataset is None and job.params["layers"] == ["layer1", "layer2"]
    assert (job.params["samples"], job.params["seed"], job.params["concepts"]) == (64, 3, "colors")
    assert "ks" not in job.params and "max_images" not in job.params

    response = post(
        type="generator_remove",
        layer="layer2",
        concept="red-c",
        ks="1 2, 4",
        samples="16",
        sample_images="4",
        layers="ignored",
    )
    job = Job.objects.latest("id")
    assert response.status_code == 302 and job.type == "generator_remove"
    assert job.params["ks"] == [1, 2, 4] and job.params["dissection"] == base["job"].pk and job.params["samples"] == 16

    response = post(
        type="generator_insert", layer="layer2", concept="red-c", k="4", insert_quantile="0.99", stride="2", samples="8"
    )
    job = Job.objects.latest("id")
    assert response.status_code == 302 and job.type == "generator_insert"
    assert (job.params["k"], job.params["quantile"], job.params["stride"]) == (4, 0.99, 2)

    count = Job.objects.count()
    dataset = Dataset.objects.create(owner=user, name="scenes", format="broden", path="/y")
    errors = [
        ({"type": "dissect", "layers": "", "dataset": dataset.pk}, "generator jobs take no dataset"),
        ({"type": "dissect", "layers": ""}, "params.layers is required"),
        (
            {"type": "generator_remove", "layer": "layer2", "concept": "purple-c"},
            "knows no concept &#x27;purple-c&#x27;",
        ),
        (
            {"type": "generator_insert", "layer": "layer1", "concept": "red-c"},
            "no succeeded dissection of layer layer1",
        ),
        ({"type": "ablate", "layer": "layer2"}, "is a generator; its job types are"),
        ({"type": "generator_remove", "layer": "layer2", "concept": "red-c", "ks": "1, two"}, "Whole numbers"),
    ]
    for fields, needle in errors:
        page = post(**fields).content.decode()
        assert needle in page, (fields, re.findall(r'<div class="errorbox".*?</div>', page, flags=re.DOTALL))
    assert Job.objects.count() == count


def test_rerun_of_generator_jobs_without_a_dataset(alice, user, tmp_path, monkeypatch):
    from api.models import Job
    from api.services import queue

    monkeypatch.setattr(queue, "job_enqueue", lambda pk: None)
    base = make_generator(user, tmp_path)
    for job in (base["job"], make_removal(user, base, tmp_path)):
        response = alice.post(f"/jobs/{job.pk}/rerun/")
        new = Job.objects.latest("id")
        assert response.status_code == 302 and response["Location"] == f"/jobs/{new.pk}/", job.type
        assert new.pk != job.pk and new.type == job.type and new.dataset is None
        # the same params, plus the defaults of any the job predates (a dissection's label evidence)
        evidence = {"evidence_blocks": 16, "resamples": 1000, "evidence_seed": 0} if job.type == "dissect" else {}
        assert new.params == {**evidence, **job.params}


def test_500_units_and_a_64x64_map_render_fast(alice, user, tmp_path):
    base = make_generator(user, tmp_path, units=500)
    removal = make_removal(user, base, tmp_path, ks=(*tuple(range(1, 501, 10)), 500))
    insertion = make_insertion(user, base, tmp_path, rows=64, cols=64, k=500, listed=False)
    timings = {}
    for url in (
        f"/jobs/{removal.pk}/",
        f"/jobs/{insertion.pk}/",
        f"/models/{base['model'].pk}/paint/",
        "/jobs/new/",
        f"/models/{base['model'].pk}/",
    ):
        alice.get(url)
        start = time.perf_counter()
        response = alice.get(url)
        timings[url] = time.perf_counter() - start
        assert response.status_code == 200
    assert max(timings.values()) < 1.0, timings
    page = alice.get(f"/jobs/{removal.pk}/").content.decode()
    assert page.count('href="/units/') == 500
    page = alice.get(f"/jobs/{insertion.pk}/").content.decode()
    assert page.count("<title>y ") == 64 * 64


def test_degenerate_results_read_honestly(alice, user, tmp_path):
    """A concept that covers every pixel and does not move, and an insertion that adds nothing
    (what a randomly initialised generator gives): the axis stops at 100%, no change is "no change",
    and no position is marked best."""
    from api.models import Job

    base = make_generator(user, tmp_path)
    removal = make_removal(user, base, tmp_path)
    removal.summary = {
        **removal.summary,
        "baseline": 1.0,
        "curve": [{"k": k, "share": 1.0, "change": 0.0} for k in (1, 2, 4, 8)],
    }
    removal.save()
    page = alice.get(f"/jobs/{removal.pk}/").content.decode()
    assert ">100.0%</text>" in page and "125" not in page and "-0.0%" not in page
    assert "<strong>no change</strong>" in page and page.count(">+0.0%</td>") == 4
    insertion = make_insertion(user, base, tmp_path)
    insertion.summary = {
        **insertion.summary,
        "map": [[0.0] * 4 for _ in range(4)],
        "mean_added": 0.0,
        "best": {"y": 0, "x": 0, "added": 0.0},
    }
    insertion.save()
    page = alice.get(f"/jobs/{insertion.pk}/").content.decode()
    assert 'class="best"' not in page and "no position added any pixels of red-c" in page
    assert Job.objects.filter(type="generator_insert").count() == 1

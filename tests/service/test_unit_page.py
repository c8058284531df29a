"""GET /api/units/ through its lean path (api.unit_page, one prepared statement) equals the
general path (the ORM and UnitSerializer, still taken with ?ordering=): the same units, fields,
values and cursor pages, for every filter, every visibility case and units stored before the
top concepts were copied onto the unit row."""

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
    ("café", "texture"),  # non-ASCII survives the JSON Postgres renders
]


def _job(owner, *, public=False, status="running", name="m"):
    from api.models import Dataset, Job, NetworkModel

    model = NetworkModel.objects.create(
        owner=owner, name=name, arch="builtin:scenecnn", weights_path="/x", public=public
    )
    dataset = Dataset.objects.create(owner=owner, name="d", format="broden", path="/y", public=public)
    return Job.objects.create(owner=owner, type="dissect", model=model, dataset=dataset, status="running")


def _evidence(rng, iou: np.ndarray) -> dict:
    units = len(iou)
    best = iou.max(1)
    runner = np.argsort(-iou, axis=1, kind="stable")[:, 1].astype(float)
    runner[::4] = -1  # no runner-up
    stability = rng.uniform(0, 1, units)
    stability[::5] = np.nan  # no evidence for this unit
    return {
        "iou_low": best * 0.8,
        "iou_high": best * 1.2,
        "stability": stability,
        "runner_up": runner,
        "runner_up_iou": np.sort(iou, axis=1)[:, -2],
        "chance_iou": best * 0.1,
        "p_value": rng.uniform(0, 0.05, units),
        "low": (iou * 0.8).astype(np.float32),
        "high": (iou * 1.2).astype(np.float32),
    }


def _fill(job, *, seed: int, layers=("conv5", "layer4.1"), units: int = 30, status="succeeded"):
    from api import services

    rng = np.random.default_rng(seed)
    for i, layer in enumerate(layers):
        # IoUs on a coarse grid, so many units tie on their best IoU (cursor pages split ties).
        iou = np.round(rng.uniform(0.0, 0.12, size=(units, len(CONCEPTS))), 2)
        iou[0] = 0.0  # a unit with no label
        services.layer_result_store(
            job=job,
            layer=layer,
            thresholds=rng.uniform(0.5, 2.0, size=units),
            iou=iou,
            concepts=CONCEPTS,
            summary={"units": units},
            top_images=rng.integers(0, 50, size=(units, 5)).tolist(),
            evidence=_evidence(rng, iou) if i == 0 else None,
        )
    job.status = status
    job.save()
    return job


@pytest.fixture()
def stored(user, other_user, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    mine = _fill(_job(user, name="mine"), seed=0)
    _fill(_job(user, name="mine-running"), seed=1, status="running")  # not visible: not succeeded
    theirs_public = _fill(_job(other_user, public=True, name="theirs"), seed=2)
    _fill(_job(other_user, name="theirs-private"), seed=3)  # not visible to alice
    return mine, theirs_public


def _lean(api, query: str) -> dict:
    with CaptureQueriesContext(connection) as queries:
        body = api.get(f"/api/units/?{query}").json()
    executes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("EXECUTE nd_units_")]
    assert len(executes) == 1, [q["sql"][:60] for q in queries.captured_queries]
    return body


def _general(api, query: str) -> dict:
    with CaptureQueriesContext(connection) as queries:
        body = api.get(f"/api/units/?{query}&ordering=-iou,id").json()
    assert not any(q["sql"].startswith("EXECUTE nd_units_") for q in queries.captured_queries)
    return body


def _queries(mine, theirs):
    return [
        "",
        "concept=tree",
        "concept=tree&category=part",
        "category=object&min_iou=0.1",
        "min_iou=0.05",
        f"model={mine.model_id}&layer=conv5",
        f"model={theirs.model_id}",
        f"job={mine.pk}&min_stability=0.5",
        "max_p_value=0.01",
        "min_stability=0.3&max_p_value=0.04&concept=sky",
        "concept=café",
        "layer=layer4.1&min_iou=0.11",
        "concept=nothing-like-it",
        f"model={theirs.model_id + 1000}",
    ]


def test_every_filter_gives_the_units_and_fields_of_the_general_path(api, stored):
    mine, theirs = stored
    seen = 0
    for query in _queries(mine, theirs):
        lean = _lean(api, f"{query}&page_size=1000")["results"]
        assert lean == _general(api, f"{query}&page_size=1000")["results"], query
        seen += len(lean)
    everything = _lean(api, "page_size=1000")["results"]
    assert len(everything) == 2 * 2 * 30  # alice's succeeded job and bob's public one, two layers each
    assert {u["model_name"] for u in everything} == {"mine", "theirs"}
    assert [u["iou"] for u in everything] == sorted((u["iou"] for u in everything), reverse=True)
    assert seen > len(everything)
    unlabelled = [u for u in everything if u["label"] is None]
    assert unlabelled and all(u["category"] is None for u in unlabelled)
    evidence = [u for u in everything if u["layer"] == "conv5" and u["stability"] is not None]
    assert evidence and all(len(u["iou_ci"]) == 2 for u in evidence)
    assert any(u["runner_up"] is None and u["margin"] is None for u in everything)
    assert all(len(u["top_concepts"]) == 5 for u in everything)
    assert any(t["concept"] == "café" for u in everything for t in u["top_concepts"])
    from api.serializers import UnitSerializer

    assert all(list(u) == UnitSerializer.Meta.fields for u in everything)  # the serializer's order


def test_units_stored_before_the_copy_read_their_scores(api, stored):
    from api.models import Unit

    mine, _theirs = stored
    before = _lean(api, "page_size=1000")["results"]
    assert Unit.objects.exclude(top_concepts_json="").count() == 4 * 2 * 30
    Unit.objects.filter(job=mine).update(top_concepts_json="")
    after = _lean(api, "page_size=1000")["results"]
    assert after == before == _general(api, "page_size=1000")["results"]


def test_cursor_pages_are_the_general_paths_forward_and_back(api, stored):
    mine, _theirs = stored
    for query in ("page_size=7", "page_size=4&min_iou=0.1", f"page_size=3&model={mine.model_id}&layer=conv5"):
        pages, lean = [], _lean(api, query)
        general = _general(api, query)
        while True:
            assert lean["results"] == general["results"], query
            pages.append(lean)
            if not lean["next"]:
                assert not general["next"]
                break
            assert "ordering" not in lean["next"]
            lean, general = api.get(lean["next"]).json(), api.get(general["next"]).json()
        assert len(pages) > 2
        ids = [u["id"] for page in pages for u in page["results"]]
        assert len(ids) == len(set(ids))
        # Back along the previous links: DRF's cursors may shift pages where IoUs tie (its own
        # "paging artifact" when the direction changes), so both paths walk back side by side.
        steps = 0
        while lean["previous"]:
            lean, general = api.get(lean["previous"]).json(), api.get(general["previous"]).json()
            assert lean["results"] == general["results"], query
            assert bool(lean["previous"]) == bool(general["previous"])
            steps += 1
        assert steps >= len(pages) - 2
        assert lean["results"][0] == pages[0]["results"][0]


def test_one_statement_whatever_the_page_size_and_bad_numbers_are_400(api, stored):
    with CaptureQueriesContext(connection) as small:
        assert len(api.get("/api/units/?concept=tree&page_size=2").json()["results"]) == 2
    with CaptureQueriesContext(connection) as large:
        assert len(api.get("/api/units/?concept=tree&page_size=1000").json()["results"]) > 2
    assert len(small.captured_queries) == len(large.captured_queries) == 2  # the token, the page
    for query in ("min_iou=lots", "model=first", "min_stability=NaN", "max_p_value=inf"):
        response = api.get(f"/api/units/?{query}")
        assert response.status_code == 400, query
        assert query.split("=")[0] in response.json()["message"] + str(response.json()["extra"])
    assert api.get("/api/units/?model=1e400").json()["results"] == []


def test_the_browsable_api_still_renders(api, stored):
    response = api.get("/api/units/?page_size=2", HTTP_ACCEPT="text/html")
    assert response.status_code == 200
    assert "text/html" in response["Content-Type"]


def test_null_characters_and_crafted_cursors_are_4xx_on_both_paths(api, stored):
    import base64

    for ordering in ("", "&ordering=-iou,id"):
        response = api.get(f"/api/units/?concept=tr%00ee{ordering}")
        assert response.status_code == 400 and "concept" in response.json()["message"], ordering
        assert "Null characters" in str(response.json()["extra"])
        for position in (b"abc", b"nan", b"inf", b"1e999"):
            cursor = base64.urlsafe_b64encode(b"o=0&p=" + position).decode()
            response = api.get(f"/api/units/?cursor={cursor}{ordering}")
            assert response.status_code == 404 and "cursor" in response.json()["message"].lower(), (ordering, position)
    cursor = base64.urlsafe_b64encode(b"o=0&p=1.5").decode()
    assert api.get(f"/api/units/?cursor={cursor}&ordering=id").status_code == 404  # ids are integers
    assert api.get(f"/api/units/?cursor={cursor}").status_code == 200  # an IoU may be 1.5 (none is)


def _spy_drf(monkeypatch) -> list[str]:
    """Records each request that reached the viewset's list (DRF's dispatch) rather than the
    route's lean answer (api.unit_page.lean_response)."""
    from api import unit_page

    calls: list[str] = []
    real = unit_page.list_response

    def list_response(request, view):
        calls.append(request.get_full_path())
        return real(request, view)

    monkeypatch.setattr(unit_page, "list_response", list_response)
    return calls


def test_a_plain_read_skips_drf_dispatch_and_answers_the_same_bytes_and_headers(api, stored, monkeypatch):
    """The route answers a plain JSON read with a token itself; DRF's dispatch (reached here by an
    Accept header DRF also answers with JSON) gives the same body and the same headers, across
    filters, page sizes and cursor pages forward and back, and a lower-case keyword."""
    from rest_framework.test import APIClient

    mine, _theirs = stored
    calls = _spy_drf(monkeypatch)
    drf_accept = "application/json, text/plain, */*"  # what axios sends: JSON, through DRF
    paths = [f"/api/units/?{q}" for q in ("", "concept=tree&page_size=3", f"model={mine.model_id}&page_size=7")]
    seen = 0
    while paths:
        path = paths.pop()
        for accept in ("", "*/*", "application/json", " application/json "):
            lean = api.get(path, HTTP_ACCEPT=accept) if accept else api.get(path)
            assert calls == [], (path, accept)
            drf = api.get(path, HTTP_ACCEPT=drf_accept)
            assert len(calls) == 1, (path, calls)
            calls.clear()
            assert lean.status_code == drf.status_code == 200
            assert lean.content == drf.content, path
            assert dict(lean.headers) == dict(drf.headers), path
        body = lean.json()
        seen += len(body["results"])
        if body["next"] and seen < 40:  # two cursor pages forward, one back
            paths.append(body["next"])
        if body["previous"] and "page_size=3" in path and seen < 12:
            paths.append(body["previous"])
    assert seen >= 20
    token = api._credentials["HTTP_AUTHORIZATION"].split()[1]
    bare = APIClient()  # (an APIClient's credentials override a request's own header)
    lower = bare.get("/api/units/?concept=tree", HTTP_AUTHORIZATION=f"token {token}")
    assert lower.status_code == 200 and lower.content == api.get("/api/units/?concept=tree").content
    assert calls == []  # DRF takes the keyword in any case too


def test_every_other_request_goes_through_drf(api, user, stored, monkeypatch, client):
    """What the lean answer leaves to DRF, answered as DRF answers it: other renderers and
    ?format=, ?ordering=, HEAD, writes, session users, missing or refused tokens, bad filters
    and cursors (in the API's error shape)."""
    import base64

    from rest_framework.test import APIClient

    calls = _spy_drf(monkeypatch)
    units = "/api/units/?concept=tree"
    assert "text/html" in api.get(units, HTTP_ACCEPT="text/html")["Content-Type"]
    assert "text/html" in api.get(f"{units}&format=api")["Content-Type"]
    assert api.get(f"{units}&format=json").json()["results"]
    assert api.get(f"{units}&ordering=id").json()["results"]  # the general path: no list_response
    assert api.head(units).status_code == 200
    # ?format=json and HEAD reach the viewset's statement; HTML and ?ordering= its general path
    assert [c.split("?")[1] for c in calls] == ["concept=tree&format=json", "concept=tree"], calls
    post = api.post("/api/units/", {}, format="json")
    assert post.status_code == 405 and post["Allow"] == "GET, HEAD, OPTIONS"
    client.force_login(user)  # a session user (the dashboard's): DRF's SessionAuthentication
    assert client.get(units).json()["results"] and len(calls) == 3
    token = api._credentials["HTTP_AUTHORIZATION"].split()[1]
    bare = APIClient()  # (an APIClient's credentials override a request's own header)
    for header in ("", "Token", f"Token {token} extra", f"Bearer {token}", "Token nosuchkey", "Token ab\u00e9"):
        response = bare.get(units, HTTP_AUTHORIZATION=header)
        assert response.status_code == 401, (header, response.content[:80])
        assert response.json()["message"], header
    user.is_active = False
    user.save()
    assert api.get(units).status_code == 401
    user.is_active = True
    user.save()
    assert len(calls) == 3  # DRF refused them before its list
    assert api.get("/api/units/?min_iou=lots").status_code == 400
    cursor = base64.urlsafe_b64encode(b"o=0&p=nan").decode()
    assert api.get(f"/api/units/?cursor={cursor}").status_code == 404
    assert len(calls) == 5  # the 400 and the 404 are the viewset's
    assert api.get(units).status_code == 200 and len(calls) == 5  # back on the lean answer


def test_names_are_escaped_and_non_finite_numbers_quoted_as_before(api, user):
    """The page's JSON is written by concatenation: a name with quotes, backslashes and control
    characters must survive, and a number JSON cannot hold (a NaN or infinite value written by
    hand) reads as json_build_object wrote it, a quoted string, not as broken JSON."""
    from api.models import NetworkModel, Unit

    name = 'odd "name" \\ with\ttab\nand é'
    job = _fill(_job(user, name="plain"), seed=4, layers=("conv5",), units=6)
    NetworkModel.objects.filter(pk=job.model_id).update(name=name)
    assert _lean(api, "page_size=100")["results"] == _general(api, "page_size=100")["results"]
    assert {u["model_name"] for u in _lean(api, "page_size=100")["results"]} == {name}

    target = Unit.objects.filter(job=job).exclude(runner_up=None).exclude(stability=None).order_by("-iou").first()
    Unit.objects.filter(pk=target.pk).update(
        threshold=float("nan"), runner_up_iou=float("inf"), stability=float("-inf"), chance_iou=None
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT json_build_object('t', 'NaN'::float8, 'r', 'Infinity'::float8, 's', '-Infinity'::float8)::text"
        )
        before = __import__("json").loads(cursor.fetchone()[0])
    (unit,) = [u for u in _lean(api, "page_size=100")["results"] if u["id"] == target.pk]
    assert (unit["threshold"], unit["runner_up_iou"], unit["stability"]) == (before["t"], before["r"], before["s"])
    assert unit["threshold"] == "NaN" and unit["margin"] == "-Infinity" and unit["chance_iou"] is None
    assert unit["iou"] == target.iou and unit["model_name"] == name


def test_the_admin_cannot_edit_what_units_copy(rf, admin_user):
    """Units carry copies of their concepts' names (label_name, top_concepts_json), which the
    page reads: the admin shows concept names and units read-only."""
    from django.contrib import admin

    from api.models import Concept, Unit

    request = rf.get("/admin/")
    request.user = admin_user
    assert {"name", "category"} <= set(admin.site._registry[Concept].get_readonly_fields(request))
    assert not admin.site._registry[Unit].has_change_permission(request)


# The page reads each unit's JSON from its row (Unit.page_json, written by the trigger of
# migration 0019), and builds it at read time where the row has none.


def _page_json(unit_id: int) -> tuple[str, str]:
    """A unit's stored page JSON and the one nd_unit_page_json builds from its row now."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT page_json, nd_unit_page_json(u) FROM nd_unit u WHERE id = %s", [unit_id])
        return cursor.fetchone()


def test_each_unit_is_written_with_its_page_and_the_page_reads_it(api, stored):
    from api.models import Unit

    units = list(Unit.objects.values_list("id", flat=True))
    assert len(units) == 4 * 2 * 30
    for unit_id in units:
        stored_json, built = _page_json(unit_id)
        assert stored_json == built and stored_json.startswith(f'{{"id":{unit_id},"job":')
    # Proof that the page reads the column: a value planted with the triggers off is served.
    target = _lean(api, "page_size=1")["results"][0]["id"]
    planted = f'{{"id":{target},"planted":true}}'
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("UPDATE nd_unit SET page_json = %s WHERE id = %s", [planted, target])
        cursor.execute("SET LOCAL session_replication_role = origin")
    assert _lean(api, "page_size=1")["results"] == [{"id": target, "planted": True}]
    Unit.objects.filter(pk=target).update(page_json="anything")  # written again by the trigger
    assert _page_json(target)[0] == _page_json(target)[1]


def test_units_without_a_page_are_built_at_read_time_and_the_rebuild_writes_them(api, stored):
    import io

    from django.core.management import call_command

    from api.models import Unit

    mine, _theirs = stored
    before = _lean(api, "page_size=1000")["results"]
    with connection.cursor() as cursor:  # as units stored before migration 0019 are
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("UPDATE nd_unit SET page_json = '' WHERE job_id = %s", [mine.pk])
        cursor.execute("SET LOCAL session_replication_role = origin")
    assert Unit.objects.filter(page_json="").count() == 2 * 30
    assert _lean(api, "page_size=1000")["results"] == before == _general(api, "page_size=1000")["results"]
    out = io.StringIO()
    call_command("concept_stats_rebuild", stdout=out)
    assert "unit pages: 60 units written" in out.getvalue()
    assert not Unit.objects.filter(page_json="").exists()
    assert _lean(api, "page_size=1000")["results"] == before


def test_a_renamed_model_is_renamed_in_its_units_pages(api, stored):
    from api.models import NetworkModel, Unit

    mine, theirs = stored
    model = NetworkModel.objects.get(pk=mine.model_id)
    model.name = "renamed"
    model.save()
    pages = _lean(api, f"model={mine.model_id}&page_size=1000")["results"]
    assert pages and {u["model_name"] for u in pages} == {"renamed"}
    assert pages == _general(api, f"model={mine.model_id}&page_size=1000")["results"]
    assert all(_page_json(pk)[0] == _page_json(pk)[1] for pk in Unit.objects.values_list("id", flat=True))
    assert {u["model_name"] for u in _lean(api, f"model={theirs.model_id}")["results"]} == {"theirs"}


# The lean path reads visibility from each unit's copy of it (Unit.audience, kept by the
# triggers of migration 0018); the general path joins the job and the model. They must agree
# whatever changes the job's status or the model's publicity, however it is written.


def _visible(api) -> set[int]:
    lean = _lean(api, "page_size=1000")["results"]
    assert lean == _general(api, "page_size=1000")["results"]
    return {u["id"] for u in lean}


def test_a_model_made_public_or_private_shows_or_hides_its_units(api, user, other_user, settings, tmp_path):
    from api.models import NetworkModel, Unit

    settings.MEDIA_ROOT = tmp_path / "media"
    mine = _fill(_job(user, name="mine"), seed=0, layers=("conv5",), units=6)
    theirs = _fill(_job(other_user, name="theirs"), seed=1, layers=("conv5",), units=6)
    their_units = set(Unit.objects.filter(job=theirs).values_list("id", flat=True))
    my_units = set(Unit.objects.filter(job=mine).values_list("id", flat=True))
    assert _visible(api) == my_units

    model = NetworkModel.objects.get(pk=theirs.model_id)
    model.public = True
    model.save()
    assert _visible(api) == my_units | their_units
    NetworkModel.objects.filter(pk=theirs.model_id).update(public=False)  # a queryset update too
    assert _visible(api) == my_units
    NetworkModel.objects.filter(pk=mine.model_id).update(public=True)  # public and mine: still seen
    assert _visible(api) == my_units


def test_a_job_that_stops_having_succeeded_hides_its_units(api, user, settings, tmp_path):
    from api.models import Job, Unit

    settings.MEDIA_ROOT = tmp_path / "media"
    job = _fill(_job(user, public=True), seed=2, layers=("conv5",), units=6)
    units = set(Unit.objects.filter(job=job).values_list("id", flat=True))
    assert _visible(api) == units
    Job.objects.filter(pk=job.pk).update(status="failed")
    assert _visible(api) == set()
    job.refresh_from_db()
    job.status = "succeeded"
    job.save()
    assert _visible(api) == units


def test_units_written_after_success_or_by_hand_get_the_audience_of_their_job(
    api, user, other_user, settings, tmp_path
):
    from api.models import Unit

    settings.MEDIA_ROOT = tmp_path / "media"
    theirs = _fill(_job(other_user, name="theirs"), seed=3, layers=("conv5",), units=6)
    # Inserted for a job that has already succeeded (the ORM, not the services' COPY).
    Unit.objects.create(job=theirs, model_id=theirs.model_id, layer="late", unit=0, iou=0.5, threshold=1.0)
    assert set(Unit.objects.filter(job=theirs).values_list("audience", flat=True)) == {other_user.pk}
    # An audience written by hand is computed again: bob's private units stay his.
    Unit.objects.filter(job=theirs).update(audience=0)
    assert set(Unit.objects.filter(job=theirs).values_list("audience", flat=True)) == {other_user.pk}
    assert _visible(api) == set()


def test_the_migration_fills_the_audience_of_units_stored_before_it(api, user, other_user, settings, tmp_path):
    import importlib

    from api.models import Unit

    settings.MEDIA_ROOT = tmp_path / "media"
    mine = _fill(_job(user, name="mine"), seed=4, layers=("conv5",), units=6)
    _fill(_job(other_user, public=True, name="theirs"), seed=5, layers=("conv5",), units=6)
    _fill(_job(user, name="running"), seed=6, layers=("conv5",), units=6, status="running")
    _fill(_job(other_user, name="private"), seed=7, layers=("conv5",), units=6)
    expected = dict(Unit.objects.values_list("id", "audience"))
    assert set(expected.values()) == {user.pk, 0, None, other_user.pk}
    assert expected[Unit.objects.filter(job=mine).first().pk] == user.pk
    backfill = importlib.import_module("api.migrations.0018_unit_audience").FORWARD.split(";")[1]
    assert backfill.strip().startswith("UPDATE nd_unit u")
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")  # the triggers off, as before 0018
        cursor.execute("UPDATE nd_unit SET audience = NULL")
        cursor.execute(backfill)
        cursor.execute("SET LOCAL session_replication_role = origin")
    assert dict(Unit.objects.values_list("id", "audience")) == expected
    _visible(api)


def test_the_rebuild_command_repairs_audiences_loaded_with_the_triggers_off(api, user, other_user, settings, tmp_path):
    import io

    from django.core.management import call_command

    from api.models import Unit

    settings.MEDIA_ROOT = tmp_path / "media"
    _fill(_job(user, name="mine"), seed=9, layers=("conv5",), units=6)
    _fill(_job(other_user, name="private"), seed=10, layers=("conv5",), units=6)
    _fill(_job(other_user, name="running", public=True), seed=11, layers=("conv5",), units=6, status="running")
    expected = dict(Unit.objects.values_list("id", "audience"))
    with connection.cursor() as cursor:  # a bulk load that got every audience wrong
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("UPDATE nd_unit SET audience = 0")
        cursor.execute("SET LOCAL session_replication_role = origin")
    assert len(_lean(api, "page_size=1000")["results"]) == 18  # everything shows: wrong
    out = io.StringIO()
    call_command("concept_stats_rebuild", stdout=out)
    assert "unit audiences: 18 units set from their job and model" in out.getvalue()
    assert dict(Unit.objects.values_list("id", "audience")) == expected
    _visible(api)


@pytest.mark.django_db(transaction=True)
def test_a_model_made_private_while_its_job_succeeds_never_leaves_its_units_public(user, settings, tmp_path):
    """Two sessions at once, in either order: a job succeeding takes a share lock on its model
    first, so one of the two waits for the other and the units end with the owner alone."""
    import threading
    import time

    import psycopg2

    from api.models import Job, NetworkModel, Unit

    settings.MEDIA_ROOT = tmp_path / "media"
    job = _fill(_job(user, public=True), seed=8, layers=("conv5",), units=4, status="running")
    db = connection.settings_dict
    dsn = {"dbname": db["NAME"], "user": db["USER"], "host": db["HOST"], "port": db["PORT"]}
    make_private = ("UPDATE nd_model SET public = false WHERE id = %s", (job.model_id,))
    succeed = ("UPDATE nd_job SET status = 'succeeded' WHERE id = %s", (job.pk,))
    for first, second in ((make_private, succeed), (succeed, make_private)):
        Job.objects.filter(pk=job.pk).update(status="running")
        NetworkModel.objects.filter(pk=job.model_id).update(public=True)
        one, two = psycopg2.connect(**dsn), psycopg2.connect(**dsn)
        try:
            one.cursor().execute(*first)  # not committed yet
            waiting = threading.Thread(target=lambda: two.cursor().execute(*second))  # noqa: B023
            waiting.start()
            time.sleep(0.3)
            assert waiting.is_alive(), "the second session should wait for the first"
            one.commit()
            waiting.join(10)
            two.commit()
        finally:
            one.close()
            two.close()
        assert set(Unit.objects.filter(job=job).values_list("audience", flat=True)) == {user.pk}

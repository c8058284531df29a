"""A label's evidence on the dashboard: interval, stability, runner-up and the unstable mark on
the unit page and the unit cards, and the stability bar of the model page's Figure 1d/1e."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_views import CONCEPTS, EVIL, EVIL_ESCAPED, make_dissection

pytestmark = pytest.mark.django_db

NAN = float("nan")


@pytest.fixture()
def alice(client, user):
    client.force_login(user)
    return client


@pytest.fixture()
def evidence_layer(user, settings, tmp_path):
    """A succeeded job whose conv4 went through services.layer_result_store with evidence, and
    whose conv5 has none (an older dissection). conv4's units, by label (column of CONCEPTS):

    - 0: tree 0.123 [0.101, 0.140], stability 0.97, runner-up sky 0.080, p 3.2e-05;
    - 1: tree 0.090, unstable (0.62), runner-up the concept named EVIL;
    - 2: sky 0.060, no evidence (NaN everywhere, no runner-up);
    - 3: tree 0.050, stability 0.92, runner-up wheel.
    """
    from api import services
    from api.models import Job

    settings.MEDIA_ROOT = tmp_path / "media"
    rows = make_dissection(user, status="running")
    concepts = [*CONCEPTS, (EVIL, "object")]
    iou = np.zeros((4, len(concepts)))
    iou[0, [0, 1]] = 0.123, 0.080
    iou[1, [0, 5]] = 0.090, 0.085
    iou[2, 1] = 0.060
    iou[3, [0, 2]] = 0.050, 0.030
    evidence = {
        "iou_low": np.array([0.101, 0.070, NAN, 0.030]),
        "iou_high": np.array([0.140, 0.110, NAN, 0.070]),
        "stability": np.array([0.97, 0.62, NAN, 0.92]),
        "runner_up": np.array([1, 5, -1, 2]),
        "runner_up_iou": np.array([0.080, 0.085, NAN, 0.030]),
        "chance_iou": np.array([0.012, 0.020, NAN, 0.010]),
        "p_value": np.array([3.2e-5, 0.04, NAN, 0.2]),
        "low": iou * 0.8,
        "high": iou * 1.2,
    }
    services.layer_result_store(
        job=rows["job"],
        layer="conv4",
        thresholds=np.ones(4),
        iou=iou,
        concepts=concepts,
        summary={"layer": "conv4", "units": 4, "evidence": {"detectors_stable": 2}},
        top_images=[[0, 1, 2]] * 4,
        evidence=evidence,
    )
    Job.objects.filter(pk=rows["job"].pk).update(status=Job.Status.SUCCEEDED)
    units = {u.unit: u for u in rows["job"].units.filter(layer="conv4")}
    return {**rows, "units": units}


def _card(page: str, unit: int) -> str:
    """The HTML of one unit card of a gallery page."""
    match = re.search(rf'<article[^>]*data-unit="{unit}".*?</article>', page, flags=re.DOTALL)
    assert match, f"no card for unit {unit}"
    return match.group(0)


def _section(page: str, layer: str) -> str:
    """The model page's section of one layer (its Figure 1d)."""
    start = page.index(f'id="layer-{layer}"')
    return page[start : page.index("</section>", start)]


def test_the_unit_page_shows_the_evidence(alice, evidence_layer):
    units = evidence_layer["units"]
    page = alice.get(f"/units/{units[0].pk}/").content.decode()
    assert "0.1230 <span" in page and "[0.1010, 0.1400]" in page
    assert "<dt>stability</dt><dd>97% " in page and "badge unstable" not in page
    assert "<dt>runner-up</dt>" in page and "?concept=sky" in page and "IoU 0.0800, margin 0.0430" in page
    assert "<dt>chance IoU</dt><dd>0.0120" in page and "<dt>p-value</dt><dd>3.2e-05" in page
    unstable = alice.get(f"/units/{units[1].pk}/").content.decode()
    assert 'class="badge unstable"' in unstable and "wins only 62% of bootstrap resamples" in unstable
    assert EVIL_ESCAPED in unstable and EVIL not in unstable


def test_a_unit_without_evidence_shows_nothing_extra(alice, evidence_layer):
    for unit in (evidence_layer["units"][2], evidence_layer["unit"]):
        page = alice.get(f"/units/{unit.pk}/").content.decode()
        assert "None" not in page and "stability" not in page and "runner-up" not in page, unit
        assert "bootstrap" not in page and "p-value" not in page and "badge" not in page, unit


def test_the_gallery_and_the_search_show_the_evidence_on_the_cards(alice, evidence_layer):
    job = evidence_layer["job"]
    page = alice.get(f"/jobs/{job.pk}/layers/conv4/").content.decode()
    card = _card(page, 0)
    assert '"IoU">0.123</span> <span class="ci"' in card and ">[0.101, 0.140]</span>" in card
    assert "stability 97%" in card
    assert '2nd <span class="runner-name">sky</span> <span class="runner-iou">0.080' in card and "(−0.043)" in card
    assert "unstable" not in card
    card = _card(page, 1)
    assert 'class="badge unstable"' in card and "wins only 62% of bootstrap resamples" in card
    card = _card(page, 2)
    assert "None" not in card and "card-evidence" not in card and "[" not in card
    assert "In brackets: the IoU's 95% bootstrap interval" in page
    older = alice.get(f"/jobs/{job.pk}/layers/conv5/").content.decode()
    assert "None" not in older and "card-evidence" not in older and "In brackets" not in older
    search = alice.get("/search/?concept=tree").content.decode()
    assert "[0.101, 0.140]" in search and "stability 97%" in search and 'class="badge unstable"' in search
    assert 'class="card-model">net · <code>conv4</code>' in search and '"unit-no">unit 0<' in search


def test_the_gallery_filters_by_stability(alice, evidence_layer):
    url = f"/jobs/{evidence_layer['job'].pk}/layers/conv4/"

    def cards(query):
        page = alice.get(url + query).content.decode()
        return sorted(int(n) for n in re.findall(r'data-unit="(\d+)"', page)), page

    assert cards("")[0] == [0, 1, 2, 3]
    stable, page = cards("?min_stability=0.9")
    assert stable == [0, 3] and '<option value="0.9" selected>' in page
    assert cards("?min_stability=0.95")[0] == [0]
    everything, page = cards("?min_stability=junk")
    assert everything == [0, 1, 2, 3] and "The stability bar must be a number from 0 to 1" in page


def test_the_stability_bar_changes_the_figure_1_counts(alice, evidence_layer):
    url = f"/models/{evidence_layer['model'].pk}/"
    page = alice.get(url).content.decode()
    conv4 = _section(page, "conv4")
    assert "<title>tree (object): 3 units</title>" in conv4 and "<title>sky (object): 1 units</title>" in conv4
    assert "4 of 4 units are detectors of 2 concepts" in conv4
    assert "No stability bar:" in page and '<option value="" selected>any</option>' in page

    page = alice.get(url + "?min_stability=0.9").content.decode()
    conv4 = _section(page, "conv4")
    assert "<title>tree (object): 2 units</title>" in conv4 and "sky (object)" not in conv4
    assert "2 of 4 units are detectors of 1 concepts (labels with stability ≥ 90%)" in conv4
    assert "min_stability=0.9" in conv4 and "IoU ≥ 0.04 and stability ≥ 90%" in conv4
    assert "Stability bar in force: ≥ 90%." in page and '<option value="0.9" selected>' in page
    assert "this dissection computed no label evidence" in _section(page, "conv5")
    assert "<title>tree (object): 1 units</title>" in alice.get(url + "?min_stability=0.95").content.decode()

    for bad in ("junk", "2", "nan", "-0.1"):
        response = alice.get(url + f"?min_stability={bad}")
        page = response.content.decode()
        assert response.status_code == 200, bad
        assert "The stability bar must be a number from 0 to 1" in page and "No stability bar:" in page, bad
        assert "<title>tree (object): 3 units</title>" in _section(page, "conv4"), bad

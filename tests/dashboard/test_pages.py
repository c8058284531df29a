"""The dashboard in a real browser (Debian's Chromium through Playwright) against a live server
and a real Celery worker: log in, register, submit a dissection, watch it finish on the live
job list, browse the units, search a concept. Screenshots: test-artifacts/screenshots/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


@pytest.fixture()
def page(monkeypatch):
    """A 1366x768 page; console errors and uncaught exceptions are collected in page.errors."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    # Playwright's sync API keeps an event loop in this thread; the ORM calls made here are synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1366, "height": 768})
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
        try:
            yield page
        finally:
            context.close()
            browser.close()


def shot(page, name: str, *, full_page: bool = True) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def images_loaded(page, first: int = 16) -> None:
    """Wait until the first strips on the page (those in or near the viewport) have loaded."""
    page.wait_for_function(
        f"() => [...document.querySelectorAll('img.strip')].slice(0, {first}).every(i => i.complete && i.naturalWidth > 0)"
    )


def submit(page, form: str) -> None:
    page.locator(f"{form} button[type=submit]").click()
    page.wait_for_load_state("domcontentloaded")


def test_dissect_watch_browse_and_search(live_server, celery_worker_process, user, scenes, demo_weights, page):
    from playwright.sync_api import expect

    weights, num_classes = demo_weights
    base = live_server.url

    page.goto(base + "/")
    assert "/login/" in page.url
    shot(page, "00-login", full_page=False)
    page.fill("#id_username", "alice")
    page.fill("#id_password", "pw-alice")
    submit(page, "form.form")
    expect(page).to_have_url(base + "/")
    header = page.evaluate("getComputedStyle(document.querySelector('header.top')).backgroundColor")
    assert header == "rgb(31, 41, 55)", "the dashboard stylesheet did not load"

    page.get_by_role("link", name="Register model").click()
    page.fill("#id_name", "scenecnn")
    page.fill("#id_arch", "builtin:scenecnn")
    page.fill("#id_num_classes", str(num_classes))
    page.fill("#id_input_size", "64")
    page.fill("#id_weights_path", "/etc/hostname")
    submit(page, "form.form")
    expect(page.locator(".errorbox")).to_contain_text("outside the configured data roots")
    shot(page, "01-model-form-error")
    page.fill("#id_weights_path", str(weights))
    submit(page, "form.form")
    expect(page).to_have_url(re.compile(r"/models/\d+/$"))
    model_url = page.url

    page.get_by_role("link", name="Register dataset").click()
    page.fill("#id_name", "scenes")
    page.select_option("#id_format", "synthetic")
    page.fill("#id_path", str(scenes))
    submit(page, "form.form")
    expect(page).to_have_url(base + "/datasets/")
    expect(page.locator("table.data tbody")).to_contain_text("scenes")

    page.get_by_role("link", name="New job").click()
    page.select_option("#id_model", label="scenecnn (builtin:scenecnn)")
    page.select_option("#id_dataset", label="scenes (synthetic)")
    for layer in ("conv5", "conv3", "conv4"):
        page.check(f"#layer-options input[value='{layer}']")
    assert page.input_value("#id_layers") == "conv3, conv4, conv5"
    page.fill("#id_quantile", "0.99")
    shot(page, "02-job-form")
    submit(page, "#job-form")
    expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
    job_id = int(page.url.rstrip("/").rsplit("/", 1)[1])

    page.get_by_role("link", name="Jobs", exact=True).click()
    page.evaluate("window.notReloaded = true")
    status = page.locator(f'tr[data-id="{job_id}"] .status')
    row = f'tr[data-id="{job_id}"]'
    page.wait_for_function(
        f"""() => {{ const s = document.querySelector('{row} .status'), p = document.querySelector('{row} .pct');
                   return s && (s.textContent === 'succeeded' || (s.textContent === 'running' && p.textContent !== '0%')); }}""",
        timeout=60_000,
    )
    shot(page, "03-jobs-live", full_page=False)
    expect(status).to_have_text("succeeded", timeout=150_000)
    assert page.evaluate("window.notReloaded") is True, "the job list reloaded instead of updating in place"
    expect(page.locator(f"{row} .pct")).to_have_text("100%")
    shot(page, "04-jobs-succeeded", full_page=False)

    page.locator(f'tr[data-id="{job_id}"] a[href="/jobs/{job_id}/"]').click()
    layers = page.locator("table.data tbody tr")
    expect(layers).to_have_count(3)
    expect(layers.nth(0)).to_contain_text("conv3")
    shot(page, "05-job")

    layers.filter(has_text="conv5").get_by_role("link", name="Unit gallery").click()
    expect(page).to_have_url(f"{base}/jobs/{job_id}/layers/conv5/")
    cards = page.locator(".unit-card")
    expect(cards).to_have_count(128)
    images_loaded(page)
    shot(page, "06-gallery", full_page=False)
    concept = cards.first.locator(".label-name").inner_text()
    category = page.locator("select[name=category] option").nth(1).get_attribute("value")
    page.select_option("select[name=category]", category)
    expect(page).to_have_url(re.compile(r"category=" + re.escape(category)))
    chips = page.locator(".unit-card .chip")
    assert chips.count() >= 1 and set(chips.all_inner_texts()) == {category}
    images_loaded(page)
    shot(page, "07-gallery-filtered", full_page=False)

    cards.first.locator("a").click()
    expect(page).to_have_url(re.compile(r"/units/\d+/$"))
    assert page.locator("table.scores tbody tr").count() == 5
    images_loaded(page, 1)
    shot(page, "08-unit")

    page.goto(model_url)
    expect(page.locator("svg.chart").first).to_be_visible()
    assert page.locator("svg.chart").count() >= 1
    shot(page, "09-model")

    page.get_by_role("link", name="Unit search").click()
    page.fill("input[name=concept]", concept.upper())
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/search/\?concept="))
    found = page.locator(".unit-card")
    expect(found.first).to_be_visible()
    labels = found.locator(".label-name").all_inner_texts()
    assert labels and set(labels) == {concept}
    ious = [float(x) for x in found.locator(".iou").all_inner_texts()]
    assert ious == sorted(ious, reverse=True)
    images_loaded(page)
    shot(page, "10-search", full_page=False)
    from api.models import Concept

    page.goto(f"{live_server.url}/search/")  # nothing searched: the concepts with the most units
    chips = page.locator("p.concepts a.chip")
    expect(chips.first).to_be_visible()
    assert chips.first.inner_text().split()[0] in set(Concept.objects.values_list("name", flat=True))
    assert (chips.first.get_attribute("style") or "").startswith("--c: #")
    shot(page, "10b-search-suggestions", full_page=False)

    from datetime import timedelta

    from django.db import connections
    from django.utils import timezone

    from api.models import Job

    done = Job.objects.get(pk=job_id)
    failed = Job.objects.create(
        owner=done.owner,
        type="dissect",
        model=done.model,
        dataset=done.dataset,
        params=done.params,
        status="failed",
        phase="failed",
        progress=0.4,
        attempts=1,
        started=timezone.now(),
        finished=timezone.now() + timedelta(seconds=4),
        error="Traceback (most recent call last):\n"
        + '  File "dissect.py", line 1, in run\n' * 12
        + "DissectError: the images folder is empty <b>not bold</b>",
    )
    connections.close_all()  # opened inside Playwright's greenlet, which pytest-django does not clean up
    for name, path in (
        ("11-models", "/models/"),
        ("12-datasets", "/datasets/"),
        ("13-token", "/token/"),
        ("14-job-failed", f"/jobs/{failed.pk}/"),
    ):
        page.goto(base + path)
        shot(page, name, full_page=False)
    expect(page.locator("pre.error")).to_contain_text("DissectError: the images folder is empty <b>not bold</b>")
    assert page.errors == [], page.errors


@pytest.fixture()
def generator_weights(data_root):
    """A random DCGAN whose transposed convolutions are drawn with std 0.1: PyTorch's default init
    makes every image flat grey (one colour concept, edits invisible); this gives colourful noise."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from dissect_core.gan import build_generator

    path = data_root / "dcgan-random-z16-std01.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        net = build_generator("dcgan", latent_dim=16)
        for module in net.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def log_in(page, base: str) -> None:
    page.goto(base + "/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "pw-alice")
    submit(page, "form.form")


def wait_succeeded(page) -> None:
    """On a job page, which reloads itself when the job ends."""
    from playwright.sync_api import expect

    expect(page.locator("#job-status")).to_have_text(re.compile("succeeded|failed|cancelled"), timeout=180_000)
    assert page.locator("#job-status").inner_text() == "succeeded", page.locator("pre.error").all_inner_texts()


def paint_rows(page, rows: range, cols: range, cells: int) -> None:
    """Drag across the painting grid, one stroke per row of cells."""
    box = page.locator("#paint-grid").bounding_box()
    size = box["width"] / cells
    for y in rows:
        cy = box["y"] + (y + 0.5) * size
        page.mouse.move(box["x"] + (cols.start + 0.5) * size, cy)
        page.mouse.down()
        page.mouse.move(box["x"] + (cols.stop - 0.5) * size, cy, steps=6)
        page.mouse.up()


def test_generator_dissect_paint_remove_insert(live_server, celery_worker_process, user, api, generator_weights, page):
    """Register a random DCGAN over the API; in the browser: dissect layer3 through the job form (no
    dataset, colour concepts), paint a square of a concept on a sample and see the edit, see the
    API's error, then run removal and insertion jobs from the form and look at their figures."""
    from django.db import connections

    try:
        generator_flow(live_server.url, api, generator_weights, page)
    finally:
        connections.close_all()  # opened inside Playwright's greenlet, which pytest-django does not clean up


def generator_flow(base, api, generator_weights, page) -> None:
    from playwright.sync_api import expect

    response = api.post(
        "/api/models/",
        {
            "name": "dcgan <b>toy</b>",
            "arch": "builtin:dcgan",
            "kind": "generator",
            "weights_path": str(generator_weights),
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    model = response.json()
    layer3 = next(entry for entry in model["layers"] if entry["name"] == "layer3")
    assert (layer3["height"], layer3["width"]) == (16, 16)

    log_in(page, base)
    page.goto(f"{base}/models/{model['id']}/")
    expect(page.locator("#model-facts")).to_contain_text("generator · latent of 16 numbers")
    page.goto(f"{base}/jobs/new/?model={model['id']}")
    expect(page.locator("#field-dataset")).to_be_hidden()
    expect(page.locator("#field-samples")).to_be_visible()
    expect(page.locator("#field-max_images")).to_be_hidden()
    page.check("#layer-options input[value='layer3']")
    page.fill("#id_samples", "48")
    page.select_option("#id_concepts", "colors")
    shot(page, "20-generator-job-form")
    submit(page, "#job-form")
    expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
    expect(page.locator("p.sub")).to_contain_text("on generated: 48 samples, concepts: colours")
    wait_succeeded(page)
    expect(page.locator("table.data tbody tr")).to_have_count(1)
    shot(page, "21-generator-dissection")

    page.get_by_role("link", name="Paint with these units").click()
    expect(page).to_have_url(re.compile(rf"/models/{model['id']}/paint/\?layer=layer3"))
    expect(page.locator("#paint-source")).to_be_visible(timeout=60_000)
    expect(page.locator("#paint-wait")).to_be_hidden()
    concept = page.locator("#paint-concept").input_value()
    assert concept.endswith("-c"), concept
    width = page.evaluate("document.getElementById('paint-source').naturalWidth")
    assert width == 64 and page.locator("#paint-source").bounding_box()["width"] == 448
    assert page.evaluate("getComputedStyle(document.getElementById('paint-source')).imageRendering") == "pixelated"
    paint_rows(page, range(4, 10), range(5, 11), 16)
    expect(page.locator("#paint-cells")).to_have_text("36 of 256 cells painted")
    shot(page, "22-paint-mask", full_page=False)
    page.click("#paint-run")
    expect(page.locator("#paint-after")).to_be_visible(timeout=60_000)
    expect(page.locator("#paint-timing")).to_contain_text(re.compile(r"The worker took \d+ ms"))
    expect(page.locator("#paint-after-caption")).to_have_text(f"after: {concept} added in 36 cells")
    before = page.get_attribute("#paint-before", "src")
    after = page.get_attribute("#paint-after", "src")
    assert before.startswith("data:image/png;base64,") and after != before
    assert page.locator("#paint-error").is_hidden()
    shot(page, "23-paint-after", full_page=False)
    assert page.errors == [], page.errors

    page.fill("#paint-k", "100000")
    page.click("#paint-run")
    expect(page.locator("#paint-error")).to_contain_text("k must be in 1..64")
    expect(page.locator("#paint-after")).to_be_hidden()
    shot(page, "24-paint-error", full_page=False)
    assert len(page.errors) == 1 and "400" in page.errors[0], page.errors  # the browser logs the failed request
    page.errors.clear()
    page.fill("#paint-k", "8")
    page.check("input[name=paint-mode][value=erase]")
    page.click("#paint-run")
    expect(page.locator("#paint-after-caption")).to_have_text(f"after: {concept} erased in 36 cells", timeout=60_000)
    expect(page.locator("#paint-error")).to_be_hidden()

    page.goto(f"{base}/jobs/new/?model={model['id']}&type=generator_remove")
    expect(page.locator("#id_layer")).to_have_value("layer3")
    expect(page.locator("#field-layers")).to_be_hidden()
    page.fill("#id_concept", concept)
    page.fill("#id_ks", "1, 4, 16")
    page.fill("#id_samples", "16")
    page.fill("#id_sample_images", "4")
    submit(page, "#job-form")
    wait_succeeded(page)
    expect(page.locator("#removal-chart circle")).to_have_count(4)
    expect(page.locator("#removal-table tbody tr")).to_have_count(4)
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.samples')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator(".units-ranked a[href^='/units/']").count() == 16
    shot(page, "25-generator-removal")

    page.goto(f"{base}/jobs/new/?model={model['id']}&type=generator_insert")
    page.fill("#id_concept", concept)
    page.fill("#id_k", "4")
    page.fill("#id_samples", "4")
    page.fill("#id_stride", "4")
    submit(page, "#job-form")
    wait_succeeded(page)
    expect(page.locator("#insertion-map .cells rect")).to_have_count(16)
    if page.locator("#insertion-map rect.best").count() == 0:  # a random generator may add nothing anywhere
        expect(page.locator("#insertion")).to_contain_text(f"no position added any pixels of {concept}")
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.samples')].every(i => i.complete && i.naturalWidth > 0)"
    )
    shot(page, "26-generator-insertion")

    page.goto(base + "/")
    expect(page.locator("#jobs tbody tr").first).to_contain_text("4 generated, colours")
    shot(page, "27-jobs-with-generators", full_page=False)
    assert page.errors == [], page.errors

"""The dashboard in a real browser (Debian's Chromium through Playwright) against a live server
and a real Celery worker: log in, register, submit a dissection, watch it finish on the live
job list, browse the units, search a concept. Screenshots: test-artifacts/screenshots/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
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

    from datetime import timedelta

    from django.db import connections
    from django.utils import timezone

    from api.models import Job

    done = Job.objects.get(pk=job_id)
    failed = Job.objects.create(
        owner=done.owner, type="dissect", model=done.model, dataset=done.dataset, params=done.params,
        status="failed", phase="failed", progress=0.4, attempts=1, started=timezone.now(),
        finished=timezone.now() + timedelta(seconds=4),
        error="Traceback (most recent call last):\n" + '  File "dissect.py", line 1, in run\n' * 12
        + "DissectError: the images folder is empty <b>not bold</b>",
    )
    connections.close_all()  # opened inside Playwright's greenlet, which pytest-django does not clean up
    for name, path in (("11-models", "/models/"), ("12-datasets", "/datasets/"), ("13-token", "/token/"),
                       ("14-job-failed", f"/jobs/{failed.pk}/")):
        page.goto(base + path)
        shot(page, name, full_page=False)
    expect(page.locator("pre.error")).to_contain_text("DissectError: the images folder is empty <b>not bold</b>")
    assert page.errors == [], page.errors

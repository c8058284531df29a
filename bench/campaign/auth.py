"""Auth: every operation of the OpenAPI schema but health, schema and docs needs a token; the
dashboard needs a login; tokens can be revoked; the admin site is separate from the API.
"""

from __future__ import annotations

import re

import requests

from bench.campaign.harness import Harness, password

OPEN = {"/api/health/", "/api/schema/", "/api/docs/"}
DASHBOARD = [
    "/",
    "/jobs/live/",
    "/jobs/new/",
    "/jobs/{job}/",
    "/jobs/{job}/layers/layer3/",
    "/models/",
    "/models/new/",
    "/models/{model}/",
    "/models/{generator}/paint/",
    "/datasets/",
    "/datasets/new/",
    "/units/{unit}/",
    "/search/",
    "/token/",
]


def operations(h: Harness) -> list[tuple[str, str]]:
    """(method, path) of every operation in the served schema, with alice's ids filled in."""
    schema = requests.get(f"{h.service.base}/api/schema/?format=json", timeout=30).json()
    fx = h.fixtures
    ids = {
        "models": fx.generator["id"],
        "jobs": fx.generator_job["id"],
        "datasets": fx.datasets["alice"][0]["id"],
        "units": h.sql("SELECT min(id) FROM nd_unit WHERE job_id = %s", (fx.generator_job["id"],))[0][0],
    }
    out = []
    for path, item in schema["paths"].items():
        for method in item:
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            resource = path.split("/")[2]
            filled = path.replace("{id}", str(ids.get(resource, 1))).replace("{class_name}", "street")
            filled = filled.replace("{name}", "removal-after")
            out.append((method.upper(), filled))
    return out


def _admin_session(h: Harness, user: str) -> tuple[requests.Session, requests.Response]:
    session = requests.Session()
    page = session.get(f"{h.service.base}/admin/login/", timeout=30)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    response = session.post(
        f"{h.service.base}/admin/login/?next=/admin/",
        timeout=30,
        allow_redirects=False,
        data={"username": user, "password": password(user), "csrfmiddlewaretoken": csrf, "next": "/admin/"},
        headers={"Referer": f"{h.service.base}/admin/login/"},
    )
    return session, response


def run(h: Harness) -> None:
    base = h.service.base
    ops = operations(h)
    guarded = [(m, p) for m, p in ops if p not in OPEN]
    credentials = {
        "no header": {},
        "a made-up token": {"Authorization": "Token " + "0" * 40},
        "a valid token under another scheme": {"Authorization": f"Bearer {h.tokens['alice']}"},
        "an empty token": {"Authorization": "Token "},
    }
    wrong = []
    for what, headers in credentials.items():
        for method, path in guarded:
            response = requests.request(
                method,
                base + path,
                headers=headers,
                json={} if method == "POST" else None,
                timeout=60,
                allow_redirects=False,
            )
            if response.status_code != 401:
                wrong.append(f"{method} {path} with {what}: {response.status_code}")
    opened = [(p, requests.get(base + p, timeout=30).status_code) for p in sorted(OPEN)]
    h.add(
        "auth: every endpoint needs a token",
        f"{len(guarded)} operations of the OpenAPI schema, each with no header, a made-up token, a valid token "
        "under another scheme and an empty token",
        "401 for each",
        f"{len(guarded) * len(credentials) - len(wrong)} of {len(guarded) * len(credentials)} answered 401"
        + (f"; {wrong[:3]}" if wrong else ""),
        not wrong and len(guarded) > 10,
    )
    h.add(
        "auth: health, schema and docs are open",
        "GET " + ", ".join(p for p, _ in opened) + " without a token",
        "200 each (health 200 with a live worker)",
        ", ".join(f"{p} {s}" for p, s in opened),
        all(s == 200 for _, s in opened),
    )

    fx = h.fixtures
    unit = h.sql("SELECT min(id) FROM nd_unit WHERE job_id = %s", (fx.generator_job["id"],))[0][0]
    pages = [
        p.format(job=fx.generator_job["id"], model=fx.model["alice"]["id"], generator=fx.generator["id"], unit=unit)
        for p in DASHBOARD
    ]
    leaks = []
    for headers in ({}, {"Authorization": f"Token {h.tokens['alice']}"}):
        for page in pages:
            response = requests.get(base + page, headers=headers, timeout=30, allow_redirects=False)
            if response.status_code != 302 or not response.headers.get("Location", "").startswith("/login/"):
                leaks.append(f"{page}: {response.status_code}")
    media = requests.get(f"{base}/media/results/job-{fx.generator_job['id']}/layer3.npz", timeout=30)
    h.add(
        "auth: dashboard needs a login, media is not served",
        f"{len(pages)} dashboard pages without a session (with and without an API token); a result file under /media/",
        "302 to /login/ for every page; 404 for the file",
        f"{2 * len(pages) - len(leaks)} of {2 * len(pages)} redirected to /login/"
        + (f" ({leaks[:3]})" if leaks else "")
        + f"; /media/ file {media.status_code}",
        not leaks and media.status_code == 404,
    )

    _revocation(h, guarded)
    _admin(h)


def _revocation(h: Harness, guarded: list[tuple[str, str]]) -> None:
    base = h.service.base
    old = h.tokens["carol"]
    before = requests.get(f"{base}/api/models/", headers={"Authorization": f"Token {old}"}, timeout=30).status_code
    session, login = _admin_session(h, "admin")
    carol = h.sql("SELECT id FROM auth_user WHERE username = 'carol'")[0][0]
    page = session.get(f"{base}/admin/authtoken/tokenproxy/{carol}/delete/", timeout=30)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    deleted = session.post(
        f"{base}/admin/authtoken/tokenproxy/{carol}/delete/",
        timeout=30,
        allow_redirects=False,
        data={"csrfmiddlewaretoken": csrf.group(1) if csrf else "", "post": "yes"},
        headers={"Referer": f"{base}/admin/"},
    )
    after = [
        (
            m,
            p,
            requests.request(
                m, base + p, headers={"Authorization": f"Token {old}"}, json={} if m == "POST" else None, timeout=60
            ).status_code,
        )
        for m, p in guarded
    ]
    still = [f"{m} {p}: {s}" for m, p, s in after if s != 401]
    out = h.service.manage("drf_create_token", "-r", "alice")
    new = out.strip().split()[2] if len(out.strip().split()) > 2 else ""
    h.tokens["alice_old"], h.tokens["alice"] = h.tokens["alice"], new
    old_alice = requests.get(
        f"{base}/api/models/", headers={"Authorization": f"Token {h.tokens['alice_old']}"}, timeout=30
    ).status_code
    new_alice = requests.get(f"{base}/api/models/", headers={"Authorization": f"Token {new}"}, timeout=30).status_code
    h.add(
        "auth: tokens can be revoked",
        "the admin deletes carol's token in the admin site (over HTTP); alice's token is regenerated "
        "(manage.py drf_create_token -r alice)",
        "carol's token 200 before and 401 on every operation after; alice's old token 401, her new one 200",
        f"carol before {before}; admin login {login.status_code}, delete {deleted.status_code}; after: "
        f"{len(after) - len(still)} of {len(after)} operations 401"
        + (f" ({still[:2]})" if still else "")
        + f"; alice old {old_alice}, new {new_alice}",
        before == 200 and deleted.status_code == 302 and not still and old_alice == 401 and new_alice == 200,
    )


def _admin(h: Harness) -> None:
    base = h.service.base
    anonymous = requests.get(f"{base}/admin/", timeout=30, allow_redirects=False)
    with_token = requests.get(
        f"{base}/admin/", headers={"Authorization": f"Token {h.tokens['alice']}"}, timeout=30, allow_redirects=False
    )
    alice, alice_login = _admin_session(h, "alice")
    alice_admin = alice.get(f"{base}/admin/", timeout=30, allow_redirects=False)
    admin, admin_login = _admin_session(h, "admin")
    admin_page = admin.get(f"{base}/admin/", timeout=30, allow_redirects=False)
    fx = h.fixtures
    admin_api = requests.get(
        f"{base}/api/jobs/{fx.generator_job['id']}/",
        headers={"Authorization": f"Token {h.tokens['admin']}"},
        timeout=30,
    )

    def to_login(r: requests.Response) -> bool:
        return r.status_code == 302 and r.headers.get("Location", "").startswith("/admin/login/")

    h.add(
        "auth: the admin site is separate",
        "GET /admin/ anonymously, with alice's API token, and after alice (not staff) and the admin log in to "
        "/admin/login/; the admin's API token reads alice's private job",
        "only the staff admin's session gets the admin site (200); an API token is no admin login; the admin's "
        "token has no extra rights in the API (404 for another user's private job)",
        f"anonymous {anonymous.status_code}, token {with_token.status_code}, alice login {alice_login.status_code} "
        f"then {alice_admin.status_code}, admin login {admin_login.status_code} then {admin_page.status_code}; "
        f"admin token on alice's job {admin_api.status_code}",
        to_login(anonymous)
        and to_login(with_token)
        and alice_login.status_code == 200
        and to_login(alice_admin)
        and admin_login.status_code == 302
        and admin_page.status_code == 200
        and admin_api.status_code == 404,
    )

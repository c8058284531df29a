"""No warnings in a deployment: ``manage.py check --deploy`` run with the environment compose.yaml gives
the api service is clean, and the OpenAPI schema validates with no warnings and integer ids.

This is where CI runs ``check --deploy``: with the api service's environment from compose.yaml, its
``${VAR:-default}`` defaults taken and a generated SECRET_KEY for the one compose requires. A plain
``manage.py check --deploy`` on a development checkout (no TLS variables, the built-in key) still
warns, as it should: nothing there says HTTPS is off on purpose.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TLS_CHECKS = {"security.W004", "security.W008", "security.W012", "security.W016"}


def _compose_api_environment(supplied: dict[str, str]) -> dict[str, str]:
    """The api service's environment as compose would resolve it, ``supplied`` standing for the shell
    (or .env): ``${VAR:-default}`` takes the default, ``${VAR:?message}`` needs ``supplied``."""
    env = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["api"]["environment"]

    def resolve(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if supplied.get(name):
            return supplied[name]
        assert op in (":-", ":?"), f"${{{name}}} in compose.yaml has neither a default nor a message"
        if op == ":?":
            raise LookupError(f"compose.yaml requires {name} ({arg})")
        return arg

    return {k: re.sub(r"\$\{([A-Z_]+)(:[-?])?([^}]*)\}", resolve, str(v)) for k, v in env.items()}


def _bare_env(**variables: str) -> dict[str, str]:
    """Only what a Python process needs, plus ``variables`` (not the test process's own settings)."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "SYSTEMROOT") if k in os.environ}
    return {**keep, "DJANGO_SETTINGS_MODULE": "config.settings", "PYTHONDONTWRITEBYTECODE": "1", **variables}


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _settings(**variables: str) -> dict:
    """config.settings' security values under an environment of only ``variables``."""
    code = (
        "import json, config.settings as s; print(json.dumps({n: getattr(s, n, None) for n in ("
        "'SECURE_SSL_REDIRECT', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_HSTS_SECONDS', "
        "'SECURE_HSTS_INCLUDE_SUBDOMAINS', 'SECURE_HSTS_PRELOAD', 'SECURE_PROXY_SSL_HEADER', "
        "'SILENCED_SYSTEM_CHECKS')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        env=_bare_env(**variables),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_check_deploy_is_clean_with_the_compose_api_environment():
    env = _compose_api_environment({"SECRET_KEY": secrets.token_urlsafe(50)})
    assert env["TLS"] == "true" and env["DEBUG"] == "false"
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=_bare_env(**env))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert re.fullmatch(r"System check identified no issues \(\d+ silenced\)\.", output), output


def test_compose_requires_a_secret_key_rather_than_shipping_one():
    with pytest.raises(LookupError, match="requires SECRET_KEY"):
        _compose_api_environment({})


def test_compose_api_runs_behind_a_tls_proxy_and_workers_do_not_need_to_know():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    api = services["api"]["environment"]
    assert api["TLS"] == "true"
    assert api["SECURE_PROXY_SSL_HEADER"] == "HTTP_X_FORWARDED_PROTO,https"
    assert "TLS" not in services["worker"]["environment"]


def test_tls_is_off_by_default_and_check_deploy_says_so():
    values = _settings()
    assert not (values["SECURE_SSL_REDIRECT"] or values["SESSION_COOKIE_SECURE"] or values["CSRF_COOKIE_SECURE"])
    assert values["SECURE_HSTS_SECONDS"] == 0 and values["SECURE_PROXY_SSL_HEADER"] is None
    assert values["SILENCED_SYSTEM_CHECKS"] == [], "nothing set explicitly: the warnings must show"


def test_tls_turns_every_protection_on():
    values = _settings(TLS="true", SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https")
    assert values["SECURE_SSL_REDIRECT"] and values["SESSION_COOKIE_SECURE"] and values["CSRF_COOKIE_SECURE"]
    assert values["SECURE_HSTS_SECONDS"] == 3600
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert not (values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] or values["SECURE_HSTS_PRELOAD"]), "the owner's call"
    assert values["SILENCED_SYSTEM_CHECKS"] == [], "includeSubDomains and preload unsaid: check --deploy asks"


def test_a_warning_is_silenced_only_where_its_setting_is_explicitly_off():
    assert set(_settings(TLS="false")["SILENCED_SYSTEM_CHECKS"]) == TLS_CHECKS
    assert _settings(TLS="true", SECURE_SSL_REDIRECT="false")["SILENCED_SYSTEM_CHECKS"] == ["security.W008"]
    assert _settings(TLS="true", SECURE_HSTS_SECONDS="86400")["SILENCED_SYSTEM_CHECKS"] == []
    assert (
        _settings(TLS="true", SECURE_HSTS_PRELOAD="true", SECURE_HSTS_INCLUDE_SUBDOMAINS="true")[
            "SILENCED_SYSTEM_CHECKS"
        ]
        == []
    )


def test_a_malformed_proxy_header_is_refused():
    out = subprocess.run(
        [sys.executable, "-c", "import config.settings"],
        check=False,
        cwd=ROOT,
        env=_bare_env(SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto"),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "SECURE_PROXY_SSL_HEADER must be" in out.stderr


@pytest.mark.django_db
def test_behind_the_proxy_http_redirects_https_gets_hsts_and_health_answers_plain_http(settings):
    from django.test import Client

    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    client = Client()  # a new handler: SecurityMiddleware reads the settings when it is built

    plain = client.get("/api/jobs/")
    assert plain.status_code == 301 and plain["Location"].startswith("https://")
    proxied = client.get("/api/jobs/", HTTP_X_FORWARDED_PROTO="https")
    assert proxied.status_code == 401
    assert proxied["Strict-Transport-Security"].startswith("max-age=3600")
    # compose's healthcheck asks http://127.0.0.1:8000/api/health/ directly, past the proxy
    assert client.get("/api/health/").status_code in (200, 503)


@pytest.fixture(scope="module")
def spectacular(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "schema.json"
    env = _bare_env(**_compose_api_environment({"SECRET_KEY": secrets.token_urlsafe(50)}))
    result = _manage(
        "spectacular", "--validate", "--fail-on-warn", "--format", "openapi-json", "--file", str(path), env=env
    )
    return result, path


def test_spectacular_validates_with_no_warnings(spectacular):
    result, path = spectacular
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert "Warning" not in output and "Error" not in output, output
    assert json.loads(path.read_text())["paths"]


def test_every_path_parameter_is_typed_and_every_id_is_an_integer(spectacular):
    result, path = spectacular
    assert result.returncode == 0, result.stdout + result.stderr
    schema = json.loads(path.read_text())
    seen = []
    for url, item in schema["paths"].items():
        for method, operation in item.items():
            names = set(re.findall(r"\{(\w+)\}", url))
            params = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
            assert set(params) == names, f"{method.upper()} {url}: path parameters {sorted(params)} vs {sorted(names)}"
            for name, param in params.items():
                kind = param["schema"].get("type")
                assert kind, f"{method.upper()} {url}: {name} has no type"
                if name in ("id", "pk") or name.endswith(("_id", "_pk")):
                    assert kind == "integer", f"{method.upper()} {url}: {name} is {kind}, not integer"
                seen.append((url, name, kind))
    assert ("/api/jobs/{id}/cancel/", "id", "integer") in seen
    assert ("/api/models/{id}/classes/{class_name}/important-units/", "class_name", "string") in seen

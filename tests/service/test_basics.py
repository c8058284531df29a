"""The service's frame: auth everywhere but health/schema/docs, one error shape, schema, migrations."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/api/models/", "/api/datasets/", "/api/jobs/", "/api/units/", "/api/concepts/"])
def test_every_resource_needs_a_token(client, path):
    response = client.get(path)
    assert response.status_code == 401
    assert response.json()["message"]


def test_a_revoked_token_stops_working(api, user):
    from rest_framework.authtoken.models import Token

    assert api.get("/api/models/").status_code == 200
    Token.objects.filter(user=user).delete()
    assert api.get("/api/models/").status_code == 401


def test_schema_and_docs_are_public(client):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    text = schema.content.decode()
    for path in (
        "/api/models/",
        "/api/datasets/",
        "/api/jobs/",
        "/api/jobs/{id}/cancel/",
        "/api/units/",
        "/api/health/",
    ):
        assert path in text
    assert client.get("/api/docs/").status_code == 200


def test_unknown_job_type_is_a_400_naming_it(api):
    response = api.post("/api/jobs/", {"type": "teleport", "model": 1, "dataset": 1}, format="json")
    assert response.status_code == 400
    assert "type" in response.json()["message"]


def test_paths_outside_data_roots_are_refused(api):
    response = api.post(
        "/api/models/", {"name": "x", "arch": "torchvision:resnet18", "weights_path": "/etc/passwd"}, format="json"
    )
    assert response.status_code == 400
    assert "outside the configured data roots" in response.json()["message"]


def test_migrations_are_complete():
    done = subprocess.run(
        [sys.executable, "manage.py", "makemigrations", "--check", "--dry-run"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_needs_login(client):
    response = client.get("/")
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_superuser_and_token_commands_work_as_documented(tmp_path):
    import os

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "VAR_DIR": str(tmp_path),
        "DJANGO_SUPERUSER_USERNAME": "root",
        "DJANGO_SUPERUSER_PASSWORD": "pw-root-1234",
        "DJANGO_SUPERUSER_EMAIL": "root@example.com",
    }
    env.pop("DATABASE_URL", None)
    for args in (["migrate", "--noinput"], ["createsuperuser", "--noinput"]):
        done = subprocess.run([sys.executable, "manage.py", *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "manage.py", "drf_create_token", "root"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and "Generated token" in done.stdout, done.stdout + done.stderr

"""With the database unreachable, the API answers 503 in its error shape (with Retry-After), not an HTML 500.

The outage is real: the connection is pointed at a port where nothing listens, so
psycopg's connect fails exactly as it does when Postgres is stopped.
"""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture()
def database_down():
    from django.db import connection

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict["HOST"] = "127.0.0.1"
    connection.settings_dict["PORT"] = str(dead_port)
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)
        connection.ensure_connection()


def test_api_answers_503_json_while_the_database_is_down(api, database_down):
    response = api.get("/api/models/")
    assert response.status_code == 503
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == {"message": "the database is unavailable; retry in a few seconds", "extra": {}}
    assert response["Retry-After"] == "5"


def test_unauthenticated_api_and_dashboard_answer_503_while_the_database_is_down(client, database_down):
    response = client.get("/api/models/", HTTP_AUTHORIZATION="Token " + "0" * 40)
    assert response.status_code == 503
    assert response.json()["message"].startswith("the database is unavailable")
    page = client.get("/login/")
    assert page.status_code in (200, 503)  # the login form needs no database until it is posted
    page = client.post("/login/", {"username": "alice", "password": "x"})
    assert page.status_code == 503
    assert b"database is unavailable" in page.content


def test_the_api_recovers_when_the_database_is_back(api):
    assert api.get("/api/models/").status_code == 200

"""api.authentication.TokenAuthentication: DRF's token lookup as one prepared statement, with
DRF's answers."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

pytestmark = pytest.mark.django_db


def test_a_token_authenticates_its_user_in_one_statement(api, user):
    with CaptureQueriesContext(connection) as queries:
        assert api.get("/api/webhook-secret/").status_code == 200
    assert queries.captured_queries[0]["sql"].startswith("EXECUTE nd_token_")
    from rest_framework.authtoken.models import Token

    from api.authentication import TokenAuthentication

    key = Token.objects.get(user=user).key
    found, token = TokenAuthentication().authenticate_credentials(key)
    assert (found.pk, found.username, found.is_active, found.password) == (
        user.pk,
        user.username,
        True,
        user.password,
    )
    assert token.key == key and token.user is found and token.created == Token.objects.get(key=key).created


def test_unknown_and_inactive_are_drfs_401s(api, user):
    from rest_framework.test import APIClient

    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)
    response = stranger.get("/api/models/")
    assert response.status_code == 401 and "Invalid token" in response.json()["message"]
    stranger.credentials(HTTP_AUTHORIZATION="Token abc\x00def")
    response = stranger.get("/api/models/")
    assert response.status_code == 401 and "Invalid token" in response.json()["message"]
    user.is_active = False
    user.save()
    response = api.get("/api/models/")
    assert response.status_code == 401 and "inactive" in response.json()["message"]
    user.is_active = True
    user.save()
    assert api.get("/api/models/").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_new_connection_prepares_its_statements_again(api):
    assert api.get("/api/units/").status_code == 200
    connection.close()
    assert api.get("/api/units/").status_code == 200  # a fresh server session: PREPARE again
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'nd_%%'")
        assert cursor.fetchone()[0] == 2  # the token lookup and the unit page


@pytest.mark.django_db(transaction=True)
def test_a_terminated_server_session_is_replaced_at_the_next_request(api):
    """The token lookup stands in for Django's health check (api/prepared.py): a connection
    whose server session has gone is replaced, and the request answers as before."""
    import psycopg2
    from django.db import close_old_connections

    first = api.get("/api/units/")
    assert first.status_code == 200
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    settings = connection.settings_dict
    admin = psycopg2.connect(
        dbname=settings["NAME"], user=settings["USER"], host=settings["HOST"], port=settings["PORT"] or 5432
    )
    try:
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
            assert cursor.fetchone()[0]
    finally:
        admin.close()
    close_old_connections()  # what Django's handler runs as each request starts
    second = api.get("/api/units/")
    assert second.status_code == 200 and second.json() == first.json()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid

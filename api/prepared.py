"""Statements prepared once per database connection (Postgres), for the hottest reads.

Planning a join costs about as much as running it on the hot paths (a page of units, a
token lookup): those run as ``EXECUTE`` of a statement that each connection prepares the
first time it needs it. Prepared statements live in the server session, so this assumes a
connection per session (Django's persistent connections; a pooler in transaction mode would
need them off).

The connection's health check (``CONN_HEALTH_CHECKS``): Django checks a persistent
connection at a request's first query by a ``SELECT 1`` round trip, and reconnects if the
server has gone. Where that first query is one of these statements (the token lookup of
every API request), the statement itself is the check: it runs on the connection as it is,
and if it fails because the connection is dead (a restarted or terminated server session),
the connection is closed and the statement runs once more on a new one, as it would have
after a failed check. One round trip fewer per request; the same answers.
"""

from __future__ import annotations

import hashlib
import weakref

from django.db import connection
from django.db.utils import Error as DjangoDatabaseError

# Names prepared on each raw connection (weakly keyed: a closed connection's go with it).
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def execute(tag: str, sql: str, args: list[object]) -> list[tuple]:
    """Rows of ``sql`` (one ``{}`` per argument, in order) run as a statement prepared under
    the name ``nd_<tag>_<hash of sql>``."""
    name = f"nd_{tag}_" + hashlib.sha1(sql.encode()).hexdigest()[:16]
    # The health check Django would run before this query, taken over (see the docstring);
    # not inside a transaction, where a reconnection would lose what the transaction did.
    checking = (
        connection.connection is not None
        and connection.health_check_enabled
        and not connection.health_check_done
        and not connection.in_atomic_block
    )
    if not checking:
        return _execute(name, sql, args)
    connection.health_check_done = True
    try:
        return _execute(name, sql, args)
    except (DjangoDatabaseError, connection.Database.Error):
        if connection.connection is not None and connection.is_usable():
            raise  # the statement failed, not the connection
        connection.close()
        return _execute(name, sql, args)


def _execute(name: str, sql: str, args: list[object]) -> list[tuple]:
    connection.ensure_connection()
    raw = connection.connection
    done = _prepared.setdefault(raw, set())
    if name not in done:
        # On the raw cursor: preparing is connection set-up, not one of the request's queries.
        with raw.cursor() as cursor:
            cursor.execute(f"PREPARE {name} AS " + sql.format(*(f"${i + 1}" for i in range(len(args)))))
        done.add(name)
    placeholders = ", ".join(["%s"] * len(args))
    with connection.cursor() as cursor:
        cursor.execute(f"EXECUTE {name} ({placeholders})" if args else f"EXECUTE {name}", args)
        return cursor.fetchall()

"""Statements prepared once per database connection (Postgres), for the hottest reads.

Planning a join costs about as much as running it on the hot paths (a page of units, a
token lookup): those run as ``EXECUTE`` of a statement that each connection prepares the
first time it needs it. Prepared statements live in the server session, so this assumes a
connection per session (Django's persistent connections; a pooler in transaction mode would
need them off).
"""

from __future__ import annotations

import hashlib
import weakref

from django.db import connection

# Names prepared on each raw connection (weakly keyed: a closed connection's go with it).
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def execute(tag: str, sql: str, args: list[object]) -> list[tuple]:
    """Rows of ``sql`` (one ``{}`` per argument, in order) run as a statement prepared under
    the name ``nd_<tag>_<hash of sql>``."""
    name = f"nd_{tag}_" + hashlib.sha1(sql.encode()).hexdigest()[:16]
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

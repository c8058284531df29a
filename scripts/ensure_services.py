"""Find (or start) the Postgres and Redis the test suite needs; one clear line when it cannot."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/netdissect")
BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
HINT = "start them with `docker compose up -d postgres redis`, or on Debian `pg_ctlcluster 15 main start` and `redis-server --daemonize yes`"


def reachable(url: str) -> bool:
    parts = urlparse(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


def try_start_postgres() -> None:
    if shutil.which("pg_ctlcluster"):
        for version in sorted(glob.glob("/etc/postgresql/*")):
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", os.path.basename(version), "main", "start"],
                capture_output=True,
            )


def try_start_redis() -> None:
    if shutil.which("redis-server"):
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                str(urlparse(BROKER_URL).port or 6379),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            capture_output=True,
        )


def ensure(name: str, url: str, start) -> str | None:
    if reachable(url):
        return None
    start()
    for _ in range(20):
        if reachable(url):
            return None
        time.sleep(0.5)
    parts = urlparse(url)
    return f"{name} is not reachable at {parts.hostname}:{parts.port}"


def ensure_database() -> str | None:
    import psycopg2

    parts = urlparse(DATABASE_URL)
    try:
        conn = psycopg2.connect(
            host=parts.hostname,
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password,
            dbname="postgres",
            connect_timeout=5,
        )
    except psycopg2.Error as exc:
        return f"Postgres at {parts.hostname}:{parts.port} refused the test user: {str(exc).strip().splitlines()[0]}"
    conn.close()
    return None


def main() -> int:
    problems = [
        p
        for p in (ensure("Postgres", DATABASE_URL, try_start_postgres), ensure("Redis", BROKER_URL, try_start_redis))
        if p
    ]
    if not problems:
        problem = ensure_database()
        problems = [problem] if problem else []
    if problems:
        print(f"cannot run the service tests: {'; '.join(problems)}; {HINT}", file=sys.stderr)
        return 1
    print(f"services ready: Postgres {urlparse(DATABASE_URL).netloc}, Redis {urlparse(BROKER_URL).netloc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Settings for the test suite: the machine's real Postgres and Redis (see scripts/ensure_services.py)."""

import os
from pathlib import Path

_base = Path(__file__).resolve().parent.parent
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/netdissect")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("VAR_DIR", str(_base / "var" / "test"))
os.environ.setdefault("DATA_ROOTS", str(_base / "var" / "test" / "data"))
os.environ.setdefault("JOB_HEARTBEAT_SECONDS", "0.5")
os.environ.setdefault("WORKER_HEARTBEAT_SECONDS", "1")
os.environ.setdefault("JOB_STALE_SECONDS", "6")
os.environ.setdefault("WEBHOOK_QUEUE", "celery")  # the test workers' queue
os.environ.setdefault("WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")  # receivers in the tests listen on loopback
os.environ.setdefault("WEBHOOK_RETRY_SECONDS", "0.5")
os.environ.setdefault("API_WRITE_RATE", "")  # off: tests post fast; tests/service/test_limits.py turns it on

from config.settings import *  # noqa: E402,F403

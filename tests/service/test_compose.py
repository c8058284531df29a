"""compose.yaml stays true to the code: commands, ports and environment names."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _env_names_read_by_code() -> set[str]:
    names: set[str] = set()
    for path in (
        list((ROOT / "config").glob("*.py"))
        + list((ROOT / "api").rglob("*.py"))
        + list((ROOT / "workers").rglob("*.py"))
    ):
        names |= set(re.findall(r"os\.environ(?:\.get|\.setdefault)?\(\s*\"([A-Z_]+)\"", path.read_text()))
        names |= set(re.findall(r"_env_bool\(\s*\"([A-Z_]+)\"", path.read_text()))
    return names


def test_services_present():
    assert set(_compose()["services"]) >= {"postgres", "redis", "api", "worker", "flower"}


def test_service_environment_names_are_read_by_the_code():
    read = _env_names_read_by_code()
    services = _compose()["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        unknown = set(env) - read
        assert not unknown, f"{name} sets variables the code never reads: {unknown}"
        assert {"DATABASE_URL", "REDIS_URL", "DATA_ROOTS", "MEDIA_ROOT", "SECRET_KEY"} <= set(env)


def test_api_command_serves_the_wsgi_app_on_its_published_port():
    api = _compose()["services"]["api"]
    command = " ".join(api["command"])
    module, attr = re.search(r"gunicorn (\S+):(\S+)", command).groups()
    assert (ROOT / (module.replace(".", "/") + ".py")).exists()
    assert attr in (ROOT / (module.replace(".", "/") + ".py")).read_text()
    port = re.search(r"--bind \S+:(\d+)", command).group(1)
    assert any(p.split(":")[-1] == port for p in api["ports"])
    assert "/api/health/" in str(api["healthcheck"]["test"])


def test_worker_runs_our_celery_app_with_a_gpu():
    worker = _compose()["services"]["worker"]
    command = worker["command"]
    assert command[:4] == ["celery", "-A", "config", "worker"]
    assert (ROOT / "config" / "celery.py").exists()
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"


def test_painter_consumes_the_queue_the_paint_task_is_routed_to():
    from config.celery import app

    painter = _compose()["services"]["painter"]
    command = painter["command"]
    assert command[:4] == ["celery", "-A", "config", "worker"]
    queue = command[command.index("-Q") + 1]
    assert app.conf.task_routes["workers.paint"]["queue"] == queue
    assert queue in {q.name for q in app.conf.task_queues}
    assert set(painter["environment"]) <= _env_names_read_by_code()


def test_database_and_broker_urls_point_at_the_compose_services():
    services = _compose()["services"]
    env = services["api"]["environment"]
    pg = services["postgres"]["environment"]
    assert env["DATABASE_URL"] == (
        f"postgres://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert "redis://redis:6379" in " ".join(services["flower"]["command"])

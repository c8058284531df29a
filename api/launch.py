"""Starts the API server and worker processes as children, and stops them together."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from django.conf import settings


class ServiceProcesses:
    """gunicorn on 127.0.0.1:port plus ``workers`` Celery worker processes (one task each at a time)."""

    def __init__(self, *, port: int, workers: int, log_dir: Path | None = None) -> None:
        self.port = port
        self.workers = workers
        self.log_dir = log_dir
        self.children: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            args,
            cwd=settings.BASE_DIR,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        self.children.append(proc)
        return proc

    def start(self) -> None:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGHUP, _raise_interrupt)
        bindir = Path(sys.executable).parent
        self._spawn(
            [
                str(bindir / "gunicorn"),
                "config.wsgi:application",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                os.environ.get("WEB_CONCURRENCY", "2"),
                "--timeout",
                "600",
                "--access-logfile",
                "-",
            ],
            "api",
        )
        for i in range(self.workers):
            self._spawn(_celery_worker(bindir, f"worker{i + 1}@%h"), f"worker{i + 1}")
        # The painting endpoint's worker: only the "interactive" queue, so long jobs never block it.
        self._spawn(_celery_worker(bindir, "painter@%h", "-Q", "interactive"), "painter")

    @contextlib.contextmanager
    def running(self, say: Callable[[str], object]) -> Iterator[ServiceProcesses]:
        """Start every child and wait until the service is healthy; Ctrl-C, SIGTERM or SIGHUP in the
        block ends it quietly (``say("stopping")``), and every child is stopped however it ends."""
        self.start()
        try:
            self.wait_ready()
            yield self
        except KeyboardInterrupt:
            say("stopping")
        finally:
            self.stop()

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Wait until /api/health/ answers 200 (database, broker and a live worker)."""
        import json

        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for proc in self.children:
                if proc.poll() is not None:
                    raise RuntimeError(f"a service process exited early with code {proc.returncode}: {proc.args[:3]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health/", timeout=5) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")[:300]
            except OSError as exc:
                last = str(exc)
            time.sleep(1.0)
        raise RuntimeError(f"the service did not become healthy within {timeout:.0f} s: {last}")

    def wait(self) -> None:
        while all(proc.poll() is None for proc in self.children):
            time.sleep(1.0)

    def stop(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None or proc.returncode is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def _celery_worker(bindir: Path, hostname: str, *options: str) -> list[str]:
    """The command line of one Celery worker process (one task at a time)."""
    return [
        str(bindir / "celery"),
        *("-A", "config", "worker", *options, "--concurrency", "1", "--pool", "prefork"),
        *("--loglevel", "INFO", "--hostname", hostname),
    ]


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

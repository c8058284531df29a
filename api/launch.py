"""Starts the API server and worker processes as children, and stops them together."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings


@dataclass
class _Child:
    """One supervised process: how to start it, and its current run."""

    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    due: float | None = None  # when to start it again, after it exited
    env: dict[str, str] | None = None


class ServiceProcesses:
    """gunicorn on 127.0.0.1:port, ``workers`` Celery worker processes (one task each at a time)
    and the painter, each in its own session, supervised: one that exits is started again after
    a backoff (1 s, doubling up to 60 s; back to 1 s once a run lasted 60 s), with a line saying
    which and why, while the others keep running (the jobs of a dead worker are recovered by
    the other workers' heartbeats, as on any machine).

    SIGINT, SIGTERM or SIGHUP stop everything: the first ends the ``running`` block, every child
    gets SIGTERM and 20 s to finish, then its whole process group gets SIGKILL. Signals that
    arrive while children are being started or stopped never interrupt that: a second one
    during the stop only makes it SIGKILL at once.
    """

    MAX_BACKOFF = 60.0
    HEALTHY_RUN = 60.0

    def __init__(
        self, *, port: int, workers: int, log_dir: Path | None = None, say: Callable[[str], object] = print
    ) -> None:
        self.port = port
        self.workers = workers
        self.log_dir = log_dir
        self.say = say
        self.processes: list[_Child] = []
        self.signalled: int | None = None
        self._quiet = False  # starting or stopping children: a signal is only recorded
        self._stopping = False

    @property
    def children(self) -> list[subprocess.Popen]:
        """The current run of every child that has been started."""
        return [c.proc for c in self.processes if c.proc is not None]

    def _spawn(self, child: _Child) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{child.name}.log", "ab")
        self._quiet = True
        try:
            child.proc = subprocess.Popen(
                child.args,
                cwd=settings.BASE_DIR,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
                env=child.env,
            )
        finally:
            self._quiet = False
            if out is not None:
                out.close()  # the child holds its own copy
        child.started, child.due = time.monotonic(), None
        self._check_signal()

    def _check_signal(self) -> None:
        """Act on a signal that arrived while it could only be recorded."""
        if self.signalled is not None and not self._stopping:
            raise KeyboardInterrupt(f"signal {self.signalled}")

    def _on_signal(self, signum, frame) -> None:
        first = self.signalled is None
        self.signalled = signum
        if first and not self._quiet and not self._stopping:
            raise KeyboardInterrupt(f"signal {signum}")

    def start(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        bindir = Path(sys.executable).parent
        web = [
            str(bindir / "gunicorn"),
            "config.wsgi:application",
            *("--bind", f"127.0.0.1:{self.port}"),
            *("--workers", os.environ.get("WEB_CONCURRENCY", "2")),
            *("--timeout", "600", "--access-logfile", "-"),
        ]
        # gunicorn's processes share their request metrics (GET /metrics) through this folder.
        metrics = Path(settings.VAR_DIR) / "prometheus"
        shutil.rmtree(metrics, ignore_errors=True)
        metrics.mkdir(parents=True)
        self.processes = [_Child("api", web, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)})]
        for i in range(self.workers):
            self.processes.append(_Child(f"worker{i + 1}", _celery_worker(bindir, f"worker{i + 1}@%h")))
        # The painting endpoint's worker: only the "interactive" queue, so long jobs never block it.
        self.processes.append(_Child("painter", _celery_worker(bindir, "painter@%h", "-Q", "interactive")))
        for child in self.processes:
            self._spawn(child)

    @contextlib.contextmanager
    def running(self, say: Callable[[str], object] | None = None) -> Iterator[ServiceProcesses]:
        """Start every child and wait until the service is healthy; Ctrl-C, SIGTERM or SIGHUP in the
        block ends it quietly (``say("stopping")``), and every child is stopped however it ends."""
        if say is not None:
            self.say = say
        try:
            self.start()
            self.wait_ready()
            yield self
        except KeyboardInterrupt:
            self.say("stopping")
        finally:
            self.stop()

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Wait until /api/health/ answers 200 (database, broker and a live worker)."""
        import json

        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for child in self.processes:
                if child.proc is not None and child.proc.poll() is not None:
                    raise RuntimeError(
                        f"{child.name} exited while the service was starting, with code {child.proc.returncode}"
                        + (f" (see {self.log_dir / (child.name + '.log')})" if self.log_dir else "")
                    )
            self._check_signal()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health/", timeout=5) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")[:300]
            except OSError as exc:
                last = str(exc)
            time.sleep(1.0)
        raise RuntimeError(f"the service did not become healthy within {timeout:.0f} s: {last}")

    def supervise_once(self) -> None:
        """Start again the children that exited, once their backoff is over."""
        now = time.monotonic()
        for child in self.processes:
            proc = child.proc
            if child.due is None and proc is not None and proc.poll() is not None:
                lived = now - child.started
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group (a worker's pool)
                if lived >= self.HEALTHY_RUN:
                    child.restarts = 0
                delay = min(self.MAX_BACKOFF, 2.0**child.restarts)
                child.restarts += 1
                child.due = now + delay
                self.say(
                    f"{child.name} {_exit_reason(proc.returncode)} after {lived:.0f} s; "
                    f"starting it again in {delay:.0f} s (restart {child.restarts})"
                )
            if child.due is not None and now >= child.due:
                self._spawn(child)
                self.say(f"{child.name} started again (pid {child.proc.pid if child.proc else '?'})")

    def wait(self) -> None:
        """Supervise the children until a signal stops the service."""
        while True:
            self._check_signal()
            self.supervise_once()
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM every child, SIGKILL the process groups of those still there after 20 s (at once
        on a further signal). Signals during the stop are recorded, never raised."""
        self._stopping = True
        self.signalled = None
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.signalled is None:
            if all(proc.poll() is not None for proc in self.children):
                break
            time.sleep(0.1)
        for proc in self.children:
            # the whole group: a Celery worker's pool processes, gunicorn's workers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _celery_worker(bindir: Path, hostname: str, *options: str) -> list[str]:
    """The command line of one Celery worker process (one task at a time)."""
    return [
        str(bindir / "celery"),
        *("-A", "config", "worker", *options, "--concurrency", "1", "--pool", "prefork"),
        *("--loglevel", "INFO", "--hostname", hostname),
    ]

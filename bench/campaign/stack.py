"""The campaign's own Postgres, Redis, media filesystem and service processes.

Everything here is private to the campaign (its own ports and directories under
``var/campaign``), so it can be killed and restarted without touching the machine's shared
Postgres and Redis. The service commands are those of ``api/launch.py`` and ``compose.yaml``:
gunicorn on ``config.wsgi:application``, ``celery -A config worker --concurrency 1`` workers
and one worker on the ``interactive`` queue (the painter).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("initdb not found: install Postgres (Debian: postgresql)")
    return Path(initdb).parent


class PrivatePostgres:
    """A Postgres cluster in ``folder`` on ``port`` (run as the ``postgres`` user when we are root)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = port
        self.bin = _pg_bin()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.url = f"postgres://postgres@127.0.0.1:{port}/netdissect"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        command = list(args)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {(done.stderr or done.stdout).strip()[-800:]}")
        return done

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder} "
            "-c max_connections=300"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def create_database(self) -> None:
        conn = self.connect("postgres")
        with conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE netdissect")
        conn.close()

    def connect(self, dbname: str = "netdissect"):
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=5)
        conn.autocommit = True
        return conn


class PrivateRedis:
    """A redis-server on ``port`` with an append-only file in ``folder`` (as compose.yaml runs it)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not start; see {self.folder / 'redis.log'}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """kill -9: whatever the append-only file had not written yet is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


class MediaFs:
    """MEDIA_ROOT on a tmpfs of ``size_mb``: a real filesystem that fills up."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb
        self.ballast = path / "ballast.bin"
        self.mounted = False
        self.why_not = ""

    def mount(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        if _mounted(self.path):
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
        )
        self.mounted = done.returncode == 0
        self.why_not = (done.stderr or done.stdout).strip()
        return self.mounted

    def fill(self) -> int:
        """Write zeros until the filesystem is full; returns the bytes written."""
        written = 0
        block = b"\0" * (1 << 20)
        with open(self.ballast, "wb", buffering=0) as out:
            try:
                while True:
                    written += out.write(block)
            except OSError:
                pass
            try:  # and the last bytes below a megabyte
                while out.write(b"\0" * 4096):
                    written += 4096
            except OSError:
                pass
        return written

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def unfill(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def umount(self) -> None:
        if self.mounted or _mounted(self.path):
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False


class Service:
    """The API (gunicorn) and Celery workers as children, each killable on its own."""

    def __init__(self, *, env: dict[str, str], logs: Path, api_port: int, web_workers: int) -> None:
        self.env = env
        self.logs = logs
        self.api_port = api_port
        self.web_workers = web_workers
        self.api: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.painter: subprocess.Popen | None = None
        self.started_workers = 0
        self.base = f"http://127.0.0.1:{api_port}"
        logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return proc

    def manage(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {args[0]} failed: {(done.stderr or done.stdout)[-1500:]}")
        return done.stdout

    def start_api(self) -> None:
        self.api = self._spawn(
            [
                str(BIN / "gunicorn"),
                "config.wsgi:application",
                "--bind",
                f"127.0.0.1:{self.api_port}",
                "--workers",
                str(self.web_workers),
                "--timeout",
                "120",
                "--access-logfile",
                "-",
            ],
            "api",
        )

    def start_worker(self) -> str:
        self.started_workers += 1
        name = f"campaign-w{self.started_workers}"
        env = {**self.env, "OMP_NUM_THREADS": "1"}
        self.workers[name] = self._spawn(
            [
                str(BIN / "celery"),
                "-A",
                "config",
                "worker",
                "--concurrency",
                "1",
                "--pool",
                "prefork",
                "--loglevel",
                "INFO",
                "--hostname",
                f"{name}@%h",
            ],
            name,
            env,
        )
        return name

    def start_painter(self) -> None:
        self.painter = self._spawn(
            [
                str(BIN / "celery"),
                "-A",
                "config",
                "worker",
                "-Q",
                "interactive",
                "--concurrency",
                "1",
                "--pool",
                "prefork",
                "--loglevel",
                "INFO",
                "--hostname",
                "campaign-painter@%h",
            ],
            "painter",
            {**self.env, "OMP_NUM_THREADS": "1"},
        )

    @staticmethod
    def _kill(proc: subprocess.Popen | None) -> None:
        """kill -9 the process and its children (its session)."""
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def kill_api(self) -> None:
        self._kill(self.api)

    def kill_worker(self, name: str) -> None:
        self._kill(self.workers.pop(name))

    def alive_workers(self) -> list[str]:
        return [name for name, proc in self.workers.items() if proc.poll() is None]

    def health(self, timeout: float = 5) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{self.base}/api/health/", timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read())
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    def wait_healthy(self, timeout: float = 180, workers: int = 1) -> float:
        """Seconds until /api/health/ answers 200 with at least ``workers`` live workers."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            status, body = self.health()
            if status == 200 and body.get("workers", {}).get("alive", 0) >= workers:
                return time.monotonic() - start
            time.sleep(0.25)
        raise RuntimeError(f"the service was not healthy within {timeout:.0f} s: {self.health()}")

    def stop(self) -> None:
        procs = [self.api, self.painter, *self.workers.values()]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(proc)

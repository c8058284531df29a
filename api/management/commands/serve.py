from __future__ import annotations

import os

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from api.launch import ServiceProcesses


class Command(BaseCommand):
    help = "Serve the API on 127.0.0.1:$PORT with $WORKERS Celery worker processes until Ctrl-C."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
        parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 1)))

    def handle(self, *args, port: int, workers: int, **options):
        call_command("migrate", interactive=False, verbosity=0)
        with ServiceProcesses(port=port, workers=workers).running(self.stdout.write) as procs:
            self.stdout.write(
                f"serving: API http://127.0.0.1:{port}/api/ (health /api/health/, docs /api/docs/), "
                f"dashboard http://127.0.0.1:{port}/, {workers} worker process(es), "
                f"database {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, "
                f"broker {settings.CELERY_BROKER_URL.split('://')[0]}. Ctrl-C stops."
            )
            procs.wait()

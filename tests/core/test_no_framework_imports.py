"""dissect_core is a plain torch library: importing any of it pulls in no web or task framework."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import dissect_core

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("django", "rest_framework", "celery", "drf_spectacular", "django_filters", "kombu", "redis")

PROBE = """
import importlib, json, pkgutil, sys
import dissect_core
names = ["dissect_core." + m.name for m in pkgutil.iter_modules(dissect_core.__path__)]
for name in names:
    importlib.import_module(name)
for name in dissect_core.__all__:
    getattr(dissect_core, name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def test_every_module_imports_without_frameworks() -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"dissect_core." + m.name for m in pkgutil.iter_modules(dissect_core.__path__)}
    assert set(report["modules"]) == expected and "dissect_core.dissect" in expected
    leaked = [m for m in report["loaded"] if m.split(".")[0] in FORBIDDEN]
    assert leaked == []


def test_public_api_is_listed() -> None:
    for name in (
        "dissect",
        "quantile_pass",
        "count_pass",
        "finalize",
        "LayerResult",
        "load_model",
        "list_layers",
        "trace",
        "QuantileSketch",
        "ConceptCounts",
        "upsample",
        "Segmenter",
        "unit_classifier",
    ):
        assert name in dissect_core.__all__
        assert callable(getattr(dissect_core, name))

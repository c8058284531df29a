"""The allocator setting that keeps freed memory for reuse, and its switch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = "from dissect_core.allocator import keep_freed_memory; print(keep_freed_memory(), keep_freed_memory())"


def _run(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("DISSECT_MALLOC_TUNING", None)
    if env_value is not None:
        env["DISSECT_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_keeps_freed_memory_once_set_and_the_switch_leaves_it() -> None:
    assert _run(None) == "True True"
    assert _run("0") == "False False"


def test_a_dissection_pass_sets_it() -> None:
    code = (
        "from dissect_core import allocator; from dissect_core.dissect import quantile_pass; "
        "from dissect_core.synthetic import SyntheticScenes; from dissect_core.models import load_model; "
        "print(allocator._state); m = load_model('builtin:scenecnn', num_classes=4, input_size=32); "
        "quantile_pass(m, SyntheticScenes(4, seed=0, image_size=(32, 32)), ['conv5'], batch_size=4); "
        "print(allocator._state)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    before, after = out.stdout.strip().splitlines()[-2:]
    assert before == "{}" and "'done'" in after, out.stderr[-2000:]

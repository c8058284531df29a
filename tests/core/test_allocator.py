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


RELEASE = """
from dissect_core.allocator import keep_freed_memory, release_freed_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

kept = keep_freed_memory()
big, small = [], []
for _ in range(20):  # 20 MB blocks, each followed by a small long-lived one: freed, they are holes
    big.append(bytearray(20 << 20))
    small.append(bytearray(4096))
del big
before = rss_mb()
released = release_freed_memory()
print(kept, released, before, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_holes_stay_with_the_process_until_released() -> None:
    """With the setting, 400 MB of freed blocks below live ones stay resident until
    release_freed_memory hands them back; without it, glibc gave them back at once (mmap)
    and there is nothing to release."""
    env = {k: v for k, v in os.environ.items() if k != "DISSECT_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True, env=env)
    kept, released, before, after = out.stdout.split()
    assert (kept, released) == ("True", "True")
    assert int(before) - int(after) >= 300, out.stdout
    env["DISSECT_MALLOC_TUNING"] = "0"
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True, env=env)
    kept, released, before, after = out.stdout.split()
    assert (kept, released) == ("False", "False") and int(before) < 300, out.stdout

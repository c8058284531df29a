"""Keep freed memory in the process for reuse (glibc's ``mallopt``).

A dissection allocates and frees buffers of tens of megabytes for every chunk of every
batch (upsampled maps, histograms, masks). glibc serves blocks above its mmap threshold
(dynamic, at most 32 MiB by default) straight from the kernel and gives them back on free,
and trims the top of its heap as soon as it is free, so each such buffer comes back as
fresh pages that the kernel must map and zero: on the 2-core development machine a
50 MB ``torch.zeros`` took 25 ms that way against 2.4 ms reused (measured with the
commands in docs/benchmarks.md). :func:`keep_freed_memory` raises both thresholds once per
process, so such buffers are reused; the price is that up to the trim threshold of freed
memory stays with the process. ``DISSECT_MALLOC_TUNING=0`` leaves the allocator as it is.

Freed blocks in the middle of the heap are not trimmed at all, and a pass whose buffers
vary in size can leave the heap ever more fragmented: a threshold-refinement pass over the
ViT-S MLP layer (200 scenes, brackets holding most values) grew from 1.5 to 15.9 GB that
way (3.1 GB without the setting). :func:`release_freed_memory` (glibc's ``malloc_trim``)
hands every free page back; such passes call it after each chunk (2.99 GB peak there).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "release_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20
_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process; see the module docstring).

    Returns:
        True when the allocator keeps freed memory (now or from an earlier call); False
        where it is not glibc, the call was refused, or ``DISSECT_MALLOC_TUNING=0``.
    """
    if "done" in _state:
        return _state["done"]
    done = False
    if os.environ.get("DISSECT_MALLOC_TUNING", "1") != "0" and sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state["done"] = done
    return done


def release_freed_memory() -> bool:
    """Give the free pages of every heap back to the kernel (glibc's ``malloc_trim(0)``), if
    :func:`keep_freed_memory` took effect; otherwise nothing.

    Returns:
        True when memory was released (glibc's answer), else False.
    """
    if not _state.get("done"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))

"""Benchmark of the allocator setting of dissect_core/allocator.py: how long a torch.zeros of
8 to 100 MB takes, over and over, with glibc's defaults (DISSECT_MALLOC_TUNING=0) and with freed
memory kept for reuse (the setting every dissection pass makes). Each runs in a fresh process.

Prints a table of median milliseconds per allocation.

Usage: python bench/bench_allocator.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES_MB = (8, 26, 50, 100)


def _child(repeat: int) -> None:
    import time

    import torch

    from dissect_core.allocator import keep_freed_memory

    kept = keep_freed_memory()
    out = {"kept": kept}
    for mb in SIZES_MB:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            x = torch.zeros(mb * 1_000_000 // 8, dtype=torch.int64)
            x += 1  # touch every page, as a histogram or a mask does
            times.append(time.perf_counter() - start)
            del x
        out[str(mb)] = sorted(times)[len(times) // 2] * 1e3
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        _child(args.repeat)
        return
    rows = {}
    for label, value in (("glibc defaults (DISSECT_MALLOC_TUNING=0)", "0"), ("freed memory kept (default)", "1")):
        env = dict(os.environ, DISSECT_MALLOC_TUNING=value)
        cmd = [sys.executable, __file__, "--child", "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if result["kept"] != (value == "1"):
            label += " (setting refused)"
        rows[label] = result
    print(f"torch.zeros + one add, median of {args.repeat}, ms")
    header = ["setting", *(f"{mb} MB" for mb in SIZES_MB)]
    table = [header] + [[label, *(f"{r[str(mb)]:.2f}" for mb in SIZES_MB)] for label, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()

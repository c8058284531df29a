"""``python -m bench.campaign [--quick] [--seed N] [...]``: the whole campaign, then its table.

The table (with the latency tables before it) is printed at the end and also written to
``var/campaign/report.md``, which stays until the next run. Exit status 0 when every row
held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

from bench.campaign.harness import Harness, Options
from bench.campaign.table import latency_markdown, rows_table


def parse(argv: list[str] | None = None) -> tuple[Options, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a ~3.5 minute smoke run (short load and soak, fewer examples)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock, printed)")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes (plus a painter)")
    parser.add_argument("--web-workers", type=int, default=4, help="gunicorn processes")
    parser.add_argument("--load-seconds", type=float, help="load phase length (default 180, quick 20)")
    parser.add_argument("--load-clients", type=int, default=12, help="concurrent API clients in the load phase")
    parser.add_argument("--soak-seconds", type=float, help="fault soak length (default 300, quick 60)")
    parser.add_argument("--worker-kills", type=int, help="kill -9 of a worker during the soak (default 3, quick 1)")
    parser.add_argument("--api-kills", type=int, help="kill -9 of the API during the soak (default 2, quick 1)")
    parser.add_argument("--schemathesis-examples", type=int, help="examples per operation (default 20, quick 3)")
    parser.add_argument(
        "--p95-limit",
        type=float,
        default=1.0,
        help="seconds: highest p95 latency that holds, endpoints the web process answers",
    )
    parser.add_argument(
        "--paint-p95-limit",
        type=float,
        default=5.0,
        help="seconds: highest p95 latency of painting (a round trip to a worker) that holds",
    )
    parser.add_argument("--media-mb", type=int, default=1536, help="size of the media tmpfs (MB)")
    parser.add_argument("--only", default="", help="comma-separated phases: auth,load,soak,disk,hostile")
    parser.add_argument("--keep", action="store_true", help="leave var/campaign (logs, database) after the run")
    args = parser.parse_args(argv)
    quick = args.quick
    options = Options(
        quick=quick,
        seed=args.seed if args.seed is not None else int(time.time()) % 100000,
        workers=args.workers,
        web_workers=args.web_workers,
        load_seconds=args.load_seconds or (20 if quick else 180),
        load_clients=args.load_clients,
        soak_seconds=args.soak_seconds or (60 if quick else 300),
        worker_kills=args.worker_kills if args.worker_kills is not None else (1 if quick else 3),
        api_kills=args.api_kills if args.api_kills is not None else (1 if quick else 2),
        schemathesis_examples=args.schemathesis_examples or (3 if quick else 20),
        p95_limit=args.p95_limit,
        paint_p95_limit=args.paint_p95_limit,
        media_mb=args.media_mb,
        keep=args.keep,
    )
    phases = [p for p in args.only.split(",") if p] or ["auth", "load", "soak", "disk", "hostile"]
    return options, phases


def main(argv: list[str] | None = None) -> int:
    from bench.campaign import auth, faults, hostile, integrity, load

    options, phases = parse(argv)
    command = "python -m bench.campaign " + " ".join(sys.argv[1:] if argv is None else argv)
    harness = Harness(options)
    harness.log(f"campaign {'(quick) ' if options.quick else ''}seed {options.seed}, phases {','.join(phases)}")
    try:
        harness.up()
        runners = {
            "auth": auth.run,
            "load": load.run,
            "soak": faults.run_soak,
            "disk": faults.run_disk_full,
            "hostile": hostile.run,
        }
        for phase in phases:
            harness.log(f"--- {phase}")
            try:
                runners[phase](harness)
            except Exception as exc:  # a phase that crashed is a row that failed, and the others still run
                traceback.print_exc()
                harness.add(
                    f"{phase} phase", "ran the phase", "completes", f"crashed: {type(exc).__name__}: {exc}", False
                )
        harness.log("--- integrity")
        integrity.run(harness)
    except Exception as exc:
        traceback.print_exc()
        harness.add(
            "campaign",
            "brought up the stack and ran the phases",
            "completes",
            f"crashed: {type(exc).__name__}: {exc}",
            False,
        )
    finally:
        try:
            harness.down()
        except Exception:
            traceback.print_exc()
    held = sum(r.held for r in harness.rows)
    minutes = (time.monotonic() - harness.started) / 60
    parts = [f"\n{title}\n\n{latency_markdown(table)}" for title, table in harness.latency_tables]
    parts.append(
        f"\nReliability campaign, {datetime.date.today().isoformat()}, `{command.strip()}` "
        f"(seed {options.seed}, {minutes:.1f} min, {os.cpu_count()} CPUs): "
        f"{held} of {len(harness.rows)} held\n\n" + rows_table(harness.rows)
    )
    report = "\n".join(parts)
    # Written before the table is printed: the printed table stays the last thing on stdout.
    path = write_report(harness.top / REPORT_NAME, report)
    harness.log(f"report written to {path}" if path else "the report could not be written (see above)")
    print(report)
    return 0 if harness.rows and held == len(harness.rows) else 1


REPORT_NAME = "report.md"


def write_report(path: Path, text: str) -> Path | None:
    """Write the final tables to ``path``, creating its folder; None when that failed (they are printed anyway)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip("\n") + "\n", encoding="utf-8")
    except OSError:
        traceback.print_exc()
        return None
    return path


if __name__ == "__main__":
    sys.exit(main())

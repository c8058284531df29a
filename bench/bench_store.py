"""Benchmark of the results store at scale: Postgres, the real Django/DRF view stack.

Fills its own Postgres database with synthetic dissection results (default: 1,000
models x 5 layers x 512 units, top-5 concepts per unit: 2.56 M units, 12.8 M score
rows) by binary COPY, then measures p50/p95 latency of the cross-model reads through
DRF (``APIClient`` with a token, in process) and of bulk-writing one 512-unit layer
through ``api.services.layer_result_store``. Targets: p95 of
``/api/units/?concept=X&min_iou=0.04`` under 50 ms, one layer written in under 1 s.

Usage:
    python bench/bench_store.py [--models 1000] [--layers 5] [--units 512] [--requests 200]
                                [--db netdissect_bench] [--skip-fill] [--keep]
                                [--http-clients 8] [--http-requests 1600] [--http-workers 4]
                                [--http-threads 0] [--http-only]

The database (default ``netdissect_bench`` on 127.0.0.1:5432, user postgres; override
with --admin-url) is dropped and recreated unless --skip-fill reuses a filled one;
it is dropped at the end unless --keep. ``netdissect`` and ``test_netdissect`` are
refused.

Data: one querying user ``bench`` owns 90% of the models (two thirds of those
public, one third private); a second user owns the other 10%, private, so their
units must be filtered out. 2% of the jobs are still running (their units exist but
are not visible). Unit labels follow a Zipf(0.8) law over ~1,200 Broden-like concepts
(the most frequent labels ~6% of all units); label IoU ~ Gamma(2, 0.025), about half
the units are detectors (IoU >= 0.04). Eight part concepts share an object concept's
name, so ?concept= of those names spans two categories. Every unit carries label evidence
(interval, stability ~ Beta(1 + 60 IoU, 1.5), runner-up, chance IoU, p-value falling with
the IoU), so ``min_stability`` and ``max_p_value`` select a part of each concept's units.

Fill: the unit tables' indexes and constraints are dropped, the rows generated with
numpy and sent as COPY BINARY (each unit's ``audience`` written too, the triggers that
compute it off; the running jobs' units then set to no one by the trigger; the rebuild of
the summaries below checks every unit's audience), each unit's page JSON written by its
trigger (``services.unit_pages_fill``), the indexes rebuilt, then VACUUM
ANALYZE and CHECKPOINT; each step is timed. The units bypass the services, so the per-model concept summary rows
that ``/api/concepts/`` reads are then rebuilt (``manage.py concept_stats_rebuild``, timed),
and its first page is checked against the same page counted over the units. Latencies are
wall-clock times of ``APIClient.get``, until the view's whole answer is back (each answer
decoded and checked after the timed run, as over HTTP); the first request for each
frequent concept is reported apart (cold cache). The unit query is also timed over HTTP:
gunicorn (``--http-workers``, as compose runs 4) on loopback, ``--http-clients`` concurrent
client processes (``http.client``, one connection each, kept alive where the server keeps it),
``--http-requests`` in all, each timed until its whole body has arrived, every answer decoded
and checked after the timed run; and the CPU that gunicorn's processes, Postgres's and the
clients spent per request meanwhile. ``--skip-fill --http-only`` measures only that.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROTECTED = {"netdissect", "test_netdissect", "postgres", "template0", "template1"}
LAYERS = ["layer1.0", "layer2.0", "layer3.0", "layer4.0", "layer4.1"]
CATEGORIES = [("object", 584), ("part", 234), ("material", 32), ("color", 11), ("scene", 290), ("texture", 47)]
SHARED_NAMES = 8
TOP_IMAGES = 5


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- database setup


def admin_connect(admin_url: str):
    import psycopg2

    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    return conn


def recreate_database(admin_url: str, name: str) -> None:
    if name in PROTECTED:
        raise SystemExit(f"refusing to drop database {name!r}")
    conn = admin_connect(admin_url)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def drop_database(admin_url: str, name: str) -> None:
    if name in PROTECTED:
        return
    conn = admin_connect(admin_url)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def migrate(env: dict) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"migrate failed:\n{done.stdout}\n{done.stderr}")


# ---------------------------------------------------------------- binary COPY


class ChunkReader(io.RawIOBase):
    """A file object over a generator of bytes chunks (what copy_expert reads from)."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._current = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        out = []
        while size < 0 or size > 0:
            if self._pos >= len(self._current):
                try:
                    self._current, self._pos = memoryview(next(self._chunks)), 0
                except StopIteration:
                    break
                continue
            end = len(self._current) if size < 0 else self._pos + size
            piece = self._current[self._pos : end]
            self._pos += len(piece)
            if size > 0:
                size -= len(piece)
            out.append(piece)
        return b"".join(out)


COPY_BLOCK = 1 << 20
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
COPY_TRAILER = b"\xff\xff"


def binary_rows(columns: list[tuple[str, str]], values: dict[str, np.ndarray]) -> bytes:
    """Pack columns (name, big-endian numpy type) into COPY BINARY tuples."""
    n = len(next(iter(values.values())))
    fields = [("nfields", ">i2")]
    for name, kind in columns:
        fields += [(f"len_{name}", ">i4"), (name, kind)]
    rows = np.empty(n, dtype=np.dtype(fields))
    rows["nfields"] = len(columns)
    for name, kind in columns:
        rows[f"len_{name}"] = np.dtype(kind).itemsize
        rows[name] = values[name]
    return rows.tobytes()


def copy_binary(cursor, table: str, columns: list[str], chunks) -> None:
    def stream():
        yield COPY_HEADER
        yield from chunks
        yield COPY_TRAILER

    cursor.copy_expert(
        f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT binary)", ChunkReader(stream()), size=COPY_BLOCK
    )


def fixed_width_json_lists(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Render rows of small non-negative ints as fixed-width JSON lists ("[   12,    4, ...]") bytes."""
    n, k = values.shape
    out = np.full((n, k, width + 1), ord(" "), dtype=np.uint8)
    v = values.astype(np.int64)
    for pos in range(width):
        power = 10 ** (width - 1 - pos)
        digit = (v // power) % 10 + ord("0")
        show = (v >= power) | (pos == width - 1)
        out[:, :, pos] = np.where(show, digit, ord(" "))
    out[:, :, width] = ord(",")
    flat = out.reshape(n, k * (width + 1))[:, :-1]
    jsonb = np.concatenate(
        [np.full((n, 1), 1, np.uint8), np.full((n, 1), ord("["), np.uint8), flat, np.full((n, 1), ord("]"), np.uint8)],
        axis=1,
    )
    return jsonb.view(f"S{jsonb.shape[1]}").ravel()


def top_concepts_texts(pos: np.ndarray, ious: np.ndarray, prefixes: np.ndarray) -> np.ndarray:
    """Each unit's top concepts as the service writes them into ``nd_unit.top_concepts_json``
    (``[{"concept":..,"category":..,"iou":..,"rank":..},..]``), as fixed-width bytes: the
    category is padded with spaces after its closing quote (JSON whitespace) and the IoUs,
    multiples of 1e-12 below 1, written with 12 decimals.

    Args:
        pos: [n, top] concept positions; ious: [n, top]; prefixes: [concepts, width] uint8,
            each concept's ``{"concept":"..","category":".."`` padded to one width.
    """
    n, top = pos.shape
    assert top <= 10 and (ious < 1).all()
    digits = np.rint(ious * 1e12).astype(np.int64)
    places = 10 ** np.arange(11, -1, -1, dtype=np.int64)
    iou_text = (digits[:, :, None] // places % 10 + ord("0")).astype(np.uint8)
    rank = np.broadcast_to(np.arange(top, dtype=np.uint8) + ord("0"), (n, top))[:, :, None]

    def const(text: str) -> np.ndarray:
        return np.broadcast_to(np.frombuffer(text.encode(), np.uint8), (n, top, len(text)))

    entries = np.concatenate(
        [prefixes[pos], const(',"iou":0.'), iou_text, const(',"rank":'), rank, const("},")], axis=2
    ).reshape(n, -1)
    entries[:, -1] = ord("]")
    text = np.concatenate([np.full((n, 1), ord("["), np.uint8), entries], axis=1)
    return np.ascontiguousarray(text).view(f"S{text.shape[1]}").ravel()


def concept_prefixes(names: list[str], cats: list[str]) -> np.ndarray:
    texts = [f'{{"concept":"{n}","category":"{c}"' for n, c in zip(names, cats, strict=True)]
    width = max(map(len, texts))
    return np.frombuffer("".join(t.ljust(width) for t in texts).encode(), np.uint8).reshape(len(texts), width)


# ---------------------------------------------------------------- synthetic data


def make_concepts():
    """Concept names of one width ("obj-0042"), so that unit rows pack into fixed-width COPY tuples."""
    names, cats = [], []
    for cat, count in CATEGORIES:
        for i in range(count):
            names.append(f"{cat[:3]}-{i:04d}")
            cats.append(cat)
    first_part = names.index("par-0000")
    for i in range(SHARED_NAMES):  # a few part concepts share an object's name
        names[first_part + i] = names[i]
    return names, cats


def unit_rows(
    rng,
    *,
    first_unit_id: int,
    jobs: np.ndarray,
    models: np.ndarray,
    audiences: np.ndarray,
    n_layers: int,
    n_units: int,
    concept_ids: np.ndarray,
    concept_names: np.ndarray,
    prefixes: np.ndarray,
    weights: np.ndarray,
    top: int,
):
    n_jobs = len(jobs)
    n = n_jobs * n_layers * n_units
    ids = np.arange(first_unit_id, first_unit_id + n, dtype=np.int64)
    job = np.repeat(jobs, n_layers * n_units)
    model = np.repeat(models, n_layers * n_units)
    audience = np.repeat(audiences, n_layers * n_units)
    layer_index = np.tile(np.repeat(np.arange(n_layers), n_units), n_jobs)
    layer = np.array([s.encode() for s in LAYERS[:n_layers]], dtype="S8")[layer_index]
    unit = np.tile(np.arange(n_units, dtype=np.int32), n_jobs * n_layers)
    n_concepts = len(concept_ids)
    label_pos = rng.choice(n_concepts, size=n, p=weights)
    offsets = np.cumsum(rng.integers(1, 40, size=(n, top - 1)), axis=1)
    pos = np.concatenate([label_pos[:, None], (label_pos[:, None] + offsets) % n_concepts], axis=1)
    best = np.clip(rng.gamma(2.0, 0.025, size=n), 0.001, 0.6)
    decay = np.cumprod(rng.uniform(0.55, 0.97, size=(n, top - 1)), axis=1)
    ious = np.rint(np.concatenate([best[:, None], best[:, None] * decay], axis=1) * 1e12) / 1e12
    best = ious[:, 0]
    threshold = rng.gamma(2.0, 1.0, size=n)
    images = rng.integers(0, 20000, size=(n, TOP_IMAGES))
    # Label evidence shaped like a real layer's: stability and significance grow with the IoU.
    spread = best * rng.uniform(0.1, 0.4, size=n)
    stability = np.clip(rng.beta(1.0 + 60 * best, 1.5), 0.0, 1.0)
    p_value = np.minimum(1.0, np.exp(-rng.gamma(2.0, 40 * best + 0.5, size=n)))
    units = {
        "id": ids,
        "job_id": job,
        "model_id": model,
        "layer": layer,
        "unit": unit,
        "label_id": concept_ids[label_pos],
        "label_name": concept_names[label_pos],
        "iou": best,
        "threshold": threshold,
        "top_images": fixed_width_json_lists(images),
        "top_concepts_json": top_concepts_texts(pos, ious, prefixes),
        "iou_low": best - spread,
        "iou_high": best + spread,
        "stability": stability,
        "runner_up_id": concept_ids[pos[:, 1]],
        "runner_up_iou": ious[:, 1],
        "chance_iou": best * rng.uniform(0.05, 0.5, size=n),
        "p_value": p_value,
        "audience": audience,
    }
    scores = {
        "unit_id": np.repeat(ids, top),
        "concept_id": concept_ids[pos].ravel(),
        "rank": np.tile(np.arange(top, dtype=np.int16), n),
        "iou": ious.ravel(),
    }
    return units, scores


def drop_table_indexes(cursor, tables: list[str]) -> list[str]:
    """Drop every constraint (FKs included) and index of ``tables``; return the SQL that recreates them."""
    recreate: list[str] = []
    cursor.execute(
        """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), c.contype
        FROM pg_constraint c WHERE c.conrelid = ANY(%s::regclass[]) AND c.contype IN ('p', 'u', 'f', 'c')
        ORDER BY CASE c.contype WHEN 'p' THEN 0 WHEN 'u' THEN 1 WHEN 'c' THEN 2 ELSE 3 END
        """,
        [tables],
    )
    constraints = cursor.fetchall()
    cursor.execute(
        """
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
        FROM pg_index i WHERE i.indrelid = ANY(%s::regclass[])
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u'))
        """,
        [tables],
    )
    indexes = cursor.fetchall()
    for table, name, _definition, _kind in sorted(constraints, key=lambda r: r[3] != "f"):
        cursor.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        cursor.execute(f"DROP INDEX {name}")
    for table, name, definition, _ in constraints:
        recreate.append(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
    fks = [s for s in recreate if "FOREIGN KEY" in s]
    rest = [s for s in recreate if "FOREIGN KEY" not in s]
    return rest + [sql for _, sql in indexes] + fks


def fill(args, timings: dict) -> dict:
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from rest_framework.authtoken.models import Token

    from api.models import Concept, Dataset, Job, LayerResult, NetworkModel

    rng = np.random.default_rng(args.seed)
    User = get_user_model()
    started = time.perf_counter()
    bench = User.objects.create_user(username="bench", password="pw-bench-1234")
    other = User.objects.create_user(username="other", password="pw-other-1234")
    Token.objects.create(user=bench)
    names, cats = make_concepts()
    Concept.objects.bulk_create([Concept(name=n, category=c) for n, c in zip(names, cats, strict=True)])
    rows = list(Concept.objects.order_by("id").values_list("id", "name", "category"))
    concept_ids = np.array([pk for pk, _, _ in rows], dtype=np.int64)
    concept_names = np.array([name.encode() for _, name, _ in rows], dtype="S8")
    prefixes = concept_prefixes([name for _, name, _ in rows], [cat for _, _, cat in rows])
    dataset = Dataset.objects.create(
        owner=bench,
        name="broden-like",
        format="broden",
        path="/data/broden",
        image_count=20000,
        categories=[c for c, _ in CATEGORIES],
        concept_count=len(names),
        public=True,
    )
    n_models = args.models
    n_other = n_models // 10
    owners = [other] * n_other + [bench] * (n_models - n_other)
    public = [False] * n_other + [i % 3 != 2 for i in range(n_models - n_other)]
    layers_info = [
        {"name": name, "type": "Conv2d", "units": args.units, "height": 7, "width": 7} for name in LAYERS[: args.layers]
    ]
    order = rng.permutation(n_models)
    models = NetworkModel.objects.bulk_create(
        [
            NetworkModel(
                owner=owners[i],
                name=f"net-{i:04d}",
                arch="torchvision:resnet18",
                num_classes=365,
                weights_path=f"/data/w/{i}.safetensors",
                layers=layers_info,
                public=public[i],
            )
            for i in order
        ]
    )
    running = set(rng.choice(n_models, size=max(1, n_models // 50), replace=False).tolist())
    jobs = Job.objects.bulk_create(
        [
            Job(
                owner=m.owner,
                type="dissect",
                model=m,
                dataset=dataset,
                params={"layers": LAYERS[: args.layers]},
                status=Job.Status.RUNNING if i in running else Job.Status.SUCCEEDED,
                progress=1.0,
                phase="done",
            )
            for i, m in enumerate(models)
        ]
    )
    LayerResult.objects.bulk_create(
        [
            LayerResult(
                job=j,
                layer=name,
                units=args.units,
                matrix_path=f"/media/results/job-{j.pk}/{name}.npz",
                summary={
                    "units": args.units,
                    "detectors": args.units // 2,
                    "by_category": {c: int(rng.integers(0, 60)) for c, _ in CATEGORIES},
                },
            )
            for j in jobs
            for name in LAYERS[: args.layers]
        ],
        batch_size=5000,
    )
    timings["fill: users, concepts, models, jobs"] = time.perf_counter() - started

    ranks = np.arange(1, len(concept_ids) + 1, dtype=np.float64)
    weights = ranks**-0.8
    weights = rng.permutation(weights / weights.sum())
    job_ids = np.array([j.pk for j in jobs], dtype=np.int64)
    model_ids = np.array([j.model_id for j in jobs], dtype=np.int64)
    # Who may read each job's units (Unit.audience, which a trigger computes for each row the
    # services insert): 0 everyone, else the owner. Written here, the triggers off during the
    # COPY; the running jobs' units are set to no one after it, by the trigger.
    audiences = np.array([0 if j.model.public else j.owner_id for j in jobs], dtype=np.int64)
    unit_cols = [
        ("id", ">i8"),
        ("job_id", ">i8"),
        ("model_id", ">i8"),
        ("layer", "S8"),
        ("unit", ">i4"),
        ("label_id", ">i8"),
        ("label_name", "S8"),
        ("iou", ">f8"),
        ("threshold", ">f8"),
        ("top_images", f"S{3 + 6 * TOP_IMAGES - 1}"),
        ("top_concepts_json", f"S{1 + args.top * (prefixes.shape[1] + 32)}"),  # see top_concepts_texts
        ("iou_low", ">f8"),
        ("iou_high", ">f8"),
        ("stability", ">f8"),
        ("runner_up_id", ">i8"),
        ("runner_up_iou", ">f8"),
        ("chance_iou", ">f8"),
        ("p_value", ">f8"),
        ("audience", ">i8"),
    ]
    score_cols = [("id", ">i8"), ("unit_id", ">i8"), ("concept_id", ">i8"), ("rank", ">i2"), ("iou", ">f8")]
    per_chunk = 50
    gen_time = 0.0

    def chunks():
        nonlocal gen_time
        next_unit, next_score = 1, 1
        for start in range(0, n_models, per_chunk):
            t0 = time.perf_counter()
            units, scores = unit_rows(
                rng,
                first_unit_id=next_unit,
                jobs=job_ids[start : start + per_chunk],
                models=model_ids[start : start + per_chunk],
                audiences=audiences[start : start + per_chunk],
                n_layers=args.layers,
                n_units=args.units,
                concept_ids=concept_ids,
                concept_names=concept_names,
                prefixes=prefixes,
                weights=weights,
                top=args.top,
            )
            n_scores = len(scores["unit_id"])
            scores["id"] = np.arange(next_score, next_score + n_scores, dtype=np.int64)
            next_unit += len(units["id"])
            next_score += n_scores
            packed = (binary_rows(unit_cols, units), binary_rows(score_cols, scores))
            gen_time += time.perf_counter() - t0
            yield packed

    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '1GB'")
        cursor.execute("SET synchronous_commit = off")
        t0 = time.perf_counter()
        with transaction.atomic():
            recreate = drop_table_indexes(cursor, ["nd_unit", "nd_unit_concept"])
        timings["fill: drop indexes"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        raw = cursor.cursor
        with tempfile.TemporaryFile(dir=args.tmp) as score_file:

            def unit_chunks():
                for unit_bytes, score_bytes in chunks():
                    score_file.write(score_bytes)
                    yield unit_bytes

            cursor.execute("SET session_replication_role = replica")  # no per-row trigger
            copy_binary(raw, "nd_unit", [c for c, _ in unit_cols], unit_chunks())
            cursor.execute("SET session_replication_role = origin")
            running_ids = [j.pk for j in jobs if j.status == Job.Status.RUNNING]
            cursor.execute("UPDATE nd_unit SET audience = NULL WHERE job_id = ANY(%s)", [running_ids])
            t1 = time.perf_counter()
            timings["fill: COPY units (incl. generation)"] = t1 - t0
            fill_unit_pages(connection.settings_dict)
            timings["fill: unit pages (nd_unit_page_json) and VACUUM FULL"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            score_file.seek(0)

            def score_chunks():
                while block := score_file.read(1 << 24):
                    yield block

            copy_binary(raw, "nd_unit_concept", [c for c, _ in score_cols], score_chunks())
        timings["fill: COPY unit concepts"] = time.perf_counter() - t1
        timings["fill: of which numpy generation"] = gen_time
        for table in ("nd_unit", "nd_unit_concept"):
            cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        t0 = time.perf_counter()
        for sql in recreate:
            cursor.execute(sql)
        timings["fill: rebuild indexes and constraints"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
        timings["fill: VACUUM ANALYZE"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cursor.execute("CHECKPOINT")  # flush the fill now, not during the measurements
    timings["fill: CHECKPOINT"] = time.perf_counter() - t0
    return {"user": bench.pk}


def fill_unit_pages(db: dict) -> None:
    """Each unit's page JSON (``Unit.page_json``), which the row trigger writes for the services'
    inserts and the COPY (triggers off) left empty: written by that trigger through one UPDATE
    per CPU over a share of the units, while the table has no index, then the table rewritten
    (VACUUM FULL) so that it holds one version of each unit, as inserted units are."""
    from concurrent.futures import ThreadPoolExecutor

    import psycopg2

    workers = os.cpu_count() or 1
    dsn = {"dbname": db["NAME"], "user": db["USER"], "host": db["HOST"], "port": db["PORT"] or None}
    if db.get("PASSWORD"):
        dsn["password"] = db["PASSWORD"]

    def share(k: int) -> None:
        conn = psycopg2.connect(**dsn)
        try:
            with conn, conn.cursor() as cursor:  # one transaction, committed at the end
                cursor.execute(
                    "UPDATE nd_unit SET page_json = '' WHERE id %% %s = %s AND top_concepts_json <> ''", [workers, k]
                )
        finally:
            conn.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(share, range(workers)))
    conn = psycopg2.connect(**dsn)
    try:
        conn.autocommit = True  # VACUUM runs outside a transaction
        with conn.cursor() as cursor:
            cursor.execute("VACUUM FULL nd_unit")
    finally:
        conn.close()


def rebuild_concept_stats(timings: dict) -> None:
    """The summary rows of /api/concepts/, which units loaded around the services lack."""
    from django.core.management import call_command

    t0 = time.perf_counter()
    out = io.StringIO()
    call_command("concept_stats_rebuild", stdout=out)
    timings["rebuild concept stats"] = time.perf_counter() - t0
    log(out.getvalue().strip())
    if "unit audiences:" in out.getvalue() or "unit pages:" in out.getvalue():  # the fill missed some
        raise SystemExit("fill: units with a wrong audience or no page JSON: " + out.getvalue().strip())


# ---------------------------------------------------------------- measurements


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95, ordered[-1]


def measure_get(client, paths: list[str], *, check=None) -> list[float]:
    """Wall-clock seconds of each ``client.get(path)``: until the view's whole answer is back
    in the client, as the HTTP clients time it. The answers (status and body) are kept as
    bytes, decoded and checked after the timed run: decoding a page of 100 units costs the
    client about 1 ms, which is the caller's time, not the service's."""
    out = []
    answers = []
    for path in paths:
        t0 = time.perf_counter()
        response = client.get(path)
        out.append(time.perf_counter() - t0)
        answers.append((response.status_code, response.content))
        del response
    for path, (status, content) in zip(paths, answers, strict=True):
        body = json.loads(content)
        if status != 200:
            raise SystemExit(f"GET {path} -> {status}: {body}")
        if check is not None:
            check(path, body)
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of some processes so far (from /proc; gone processes count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _pids(*pgrep: str) -> list[int]:
    done = subprocess.run(["pgrep", *pgrep], capture_output=True, text=True, check=False)
    return [int(p) for p in done.stdout.split()]


def _http_client(base: str, headers: dict, mine: list[str], ready, go, results) -> None:
    """One client of :func:`measure_http`, in a process of its own (threads of one process
    would queue behind one interpreter lock): ``http.client`` on one connection, kept alive
    where the server keeps it (sync gunicorn workers close it after each answer; the client
    then reconnects), three warm-up requests, then its share of the paths once ``go`` is set,
    each timed until its whole body has arrived. The bodies are decoded and checked after the
    timed run, so that the clients' JSON decoding does not take CPU from the server while it
    is measured (on this machine they share the CPUs). Puts (latencies, errors, its CPU
    seconds over the timed run)."""
    import http.client
    from urllib.parse import parse_qs, urlsplit

    host, port = urlsplit(base).hostname, urlsplit(base).port
    connection = http.client.HTTPConnection(host, port)

    def get(path: str) -> tuple[int, bytes]:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()

    for path in mine[:3]:  # warm each worker's connection and caches
        get(path)
    ready.put(True)
    go.wait()
    samples: list[float] = []
    answers: list[tuple[str, int, bytes]] = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for path in mine:
        t0 = time.perf_counter()
        status, body = get(path)
        samples.append(time.perf_counter() - t0)
        answers.append((path, status, body))
    after = resource.getrusage(resource.RUSAGE_SELF)
    errors: list[str] = []
    for path, status, body in answers:
        if status != 200:
            errors.append(f"GET {path} -> {status}")
            continue
        query = parse_qs(urlsplit(path).query)
        page = json.loads(body)
        for unit in page["results"]:
            if unit["label"] != query["concept"][0] or unit["iou"] < float(query["min_iou"][0]):
                errors.append(f"GET {path}: unit {unit['id']} is outside the filter")
                break
    results.put((samples, errors, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))


def measure_http(args, token: str, paths: list[str]) -> tuple[list[float], float, dict[str, float]]:
    """Latencies of GETs through gunicorn (``--http-workers`` processes, ``--http-threads``
    threads each when given) from ``--http-clients`` concurrent client processes, each with
    its own keep-alive session; the wall time of them all; and the CPU seconds per request
    that the gunicorn processes, the Postgres processes and the clients spent meanwhile."""
    import multiprocessing
    import socket

    import requests

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{port}"]
    command += ["--workers", str(args.http_workers), "--log-level", "warning"]
    if args.http_threads:
        command += ["--worker-class", "gthread", "--threads", str(args.http_threads)]
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "API_WRITE_RATE": ""})
    headers = {"Authorization": f"Token {token}"}
    context = multiprocessing.get_context("spawn")  # clean interpreters: no inherited database connection
    clients: list = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:  # any answer will do (health says 503 here: the benchmark runs no worker)
                requests.get(f"{base}/api/health/", timeout=2)
                break
            except requests.RequestException:  # not up yet, or slow to answer while it starts
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("gunicorn did not answer within 60 s")
            time.sleep(0.2)
        n = args.http_clients
        ready, go, results = context.Queue(), context.Event(), context.Queue()
        clients = [
            context.Process(target=_http_client, args=(base, headers, paths[i::n], ready, go, results))
            for i in range(n)
        ]
        for process in clients:
            process.start()
        for _ in clients:
            ready.get(timeout=120)
        web = [server.pid, *_pids("-P", str(server.pid))]
        before = {"web": _cpu_seconds(web), "db": _cpu_seconds(_pids("-x", "postgres"))}
        t0 = time.perf_counter()
        go.set()
        answers = [results.get(timeout=600) for _ in clients]
        wall = time.perf_counter() - t0
        samples = [s for mine, _, _ in answers for s in mine]
        cpu = {
            "gunicorn": _cpu_seconds(web) - before["web"],
            "Postgres": _cpu_seconds(_pids("-x", "postgres")) - before["db"],
            "clients": sum(seconds for _, _, seconds in answers),
        }
        errors = [e for _, mine, _ in answers for e in mine]
        if errors:
            raise SystemExit(f"{len(errors)} failed requests over HTTP, e.g. {errors[0]}")
        return samples, wall, {name: seconds / len(samples) for name, seconds in cpu.items()}
    finally:
        for process in clients:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        server.terminate()
        server.wait(timeout=30)


def measure(args, rows: list[tuple[str, list[float], str]]) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.db.models import Count
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    from api import selectors, services
    from api.models import Concept, Dataset, Job, NetworkModel, Unit, UnitConcept

    rng = np.random.default_rng(args.seed + 1)
    user = get_user_model().objects.get(username="bench")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get(user=user).key}")
    n = args.requests

    counts = list(Unit.objects.filter(iou__gte=0.04).values("label__name").annotate(n=Count("id")).order_by("-n"))
    head = [c["label__name"] for c in counts[:20]]
    everyone = [c["label__name"] for c in counts]
    names_head = [head[i % len(head)] for i in range(n // 2)]
    names_any = rng.choice(everyone, size=n - n // 2).tolist()

    def check_units(path, body):
        results = body["results"]
        if results and any(r["iou"] < 0.04 for r in results):
            raise SystemExit(f"{path}: a unit under min_iou")
        if results and len(results[0]["top_concepts"]) != args.top:
            raise SystemExit(f"{path}: expected {args.top} top concepts")

    interleaved = [name for pair in zip(names_head, names_any, strict=False) for name in pair]
    if not args.http_only:
        samples = measure_get(client, [f"/api/units/?concept={c}&min_iou=0.04" for c in head], check=check_units)
        rows.append(
            ("GET /api/units/?concept=X&min_iou=0.04, first request for each of the 20 (cold cache)", samples, "")
        )
        samples = measure_get(client, [f"/api/units/?concept={c}&min_iou=0.04" for c in interleaved], check=check_units)
        rows.append(
            (
                "GET /api/units/?concept=X&min_iou=0.04 (X among the 20 most frequent labels)",
                samples[0::2],
                "p95 <= 5 ms",
            )
        )
        rows.append(("GET /api/units/?concept=X&min_iou=0.04 (X any label, uniform)", samples[1::2], "p95 <= 5 ms"))
        rows.append(("  both together (requests alternate between the two)", samples, "p95 <= 5 ms"))
        for extra in ("min_stability=0.9", "max_p_value=0.01", "min_stability=0.9&max_p_value=0.01"):

            def check_evidence(path, body, extra=extra):
                check_units(path, body)
                for r in body["results"]:
                    if ("min_stability" in extra and r["stability"] < 0.9) or (
                        "max_p" in extra and r["p_value"] > 0.01
                    ):
                        raise SystemExit(f"{path}: a unit outside the evidence filter")

            samples = measure_get(
                client, [f"/api/units/?concept={c}&min_iou=0.04&{extra}" for c in interleaved], check=check_evidence
            )
            rows.append((f"GET /api/units/?concept=X&min_iou=0.04&{extra} (X as above)", samples, "p95 < 50 ms"))

    if args.http_clients:
        token = Token.objects.get(user=user).key
        paths = [f"/api/units/?concept={c}&min_iou=0.04" for c in interleaved]
        paths = (paths * (args.http_requests // len(paths) + 1))[: args.http_requests]
        samples, wall, cpu = measure_http(args, token, paths)
        threads = f" x {args.http_threads} threads" if args.http_threads else ""
        rows.append(
            (
                f"HTTP, gunicorn {args.http_workers} workers{threads}, {args.http_clients} client processes: "
                f"GET /api/units/?concept=X&min_iou=0.04 ({len(samples) / wall:.0f} requests/s)",
                samples,
                "p95 <= 20 ms",
            )
        )
        spent = ", ".join(f"{name} {seconds * 1000:.2f} ms" for name, seconds in cpu.items())
        rows.append((f"  CPU per request over HTTP: {spent}", [], ""))
    if args.http_only:
        return

    first = client.get(f"/api/units/?concept={head[0]}&min_iou=0.04").json()
    nexts = []
    page = first
    for _ in range(min(20, n)):
        if not page.get("next"):
            break
        t0 = time.perf_counter()
        response = client.get(page["next"])
        nexts.append(time.perf_counter() - t0)
        page = response.json()
    rows.append((f"GET next pages (cursor) of concept={head[0]}, pages 2..{len(nexts) + 1}", nexts, ""))

    visible_models = list(NetworkModel.objects.filter(owner=user).values_list("id", flat=True)) + list(
        NetworkModel.objects.filter(public=True).exclude(owner=user).values_list("id", flat=True)
    )
    picks = rng.choice(visible_models, size=n).tolist()
    layer_names = LAYERS[: args.layers]
    paths = [f"/api/units/?model={m}&layer={layer_names[i % len(layer_names)]}" for i, m in enumerate(picks)]
    rows.append(("GET /api/units/?model=M&layer=L", measure_get(client, paths), ""))
    paths = [f"/api/units/?min_iou=0.04&category={['object', 'part', 'material'][i % 3]}" for i in range(n // 4)]
    rows.append(("GET /api/units/?min_iou=0.04&category=C", measure_get(client, paths), ""))
    paths = [f"/api/models/{m}/layers/" for m in picks]
    rows.append(("GET /api/models/{id}/layers/", measure_get(client, paths), ""))
    k = max(3, min(10, n // 10))
    fields = ("id", "name", "category", "units", "models", "best_iou")
    t0 = time.perf_counter()
    live = [
        tuple(r[f] for f in fields) for r in selectors.concept_list_live(user=user, min_iou=0.04).values(*fields)[:50]
    ]
    live_seconds = time.perf_counter() - t0

    def check_concepts(path, body):
        if [tuple(r[f] for f in fields) for r in body["results"]] != live:
            raise SystemExit(f"{path}: the summary rows disagree with the count over the units")

    # As many requests as the min_iou rows below (10 made the "p95" the slowest, often the cold first).
    samples = measure_get(client, ["/api/concepts/"] * (4 * k), check=check_concepts)
    rows.append(("GET /api/concepts/ (summary rows)", samples, "p95 < 30 ms"))
    rows.append(("  its first page counted over the units instead (selector only, no count query)", [live_seconds], ""))
    paths = [f"/api/concepts/?category={['object', 'part', 'scene'][i % 3]}" for i in range(k)]
    rows.append(("GET /api/concepts/?category=C (summary rows)", measure_get(client, paths), ""))
    for extra, kwargs in (
        ("min_stability=0.9", {"min_stability": 0.9}),
        ("max_p_value=0.01", {"max_p_value": 0.01}),
        ("min_stability=0.9&max_p_value=0.01", {"min_stability": 0.9, "max_p_value": 0.01}),
    ):
        expected = [
            tuple(r[f] for f in fields)
            for r in selectors.concept_list_live(user=user, min_iou=0.04, **kwargs).values(*fields)[:50]
        ]

        def check_bar(path, body, expected=expected):
            if [tuple(r[f] for f in fields) for r in body["results"]] != expected:
                raise SystemExit(f"{path}: the summary rows disagree with the count over the units")

        samples = measure_get(client, [f"/api/concepts/?{extra}"] * k, check=check_bar)
        rows.append((f"GET /api/concepts/?{extra} (summary rows)", samples, ""))
    rows.append(
        (
            "GET /api/concepts/?min_stability=0.8 (counts the units)",
            measure_get(client, ["/api/concepts/?min_stability=0.8"] * k),
            "",
        )
    )
    # Any other min_iou: one IoU cell per scope and bucket (checked against the units).
    thresholds = [0.0, 0.0123, 0.05, 0.1, 0.2, 0.3333]
    for t in thresholds[:2]:
        expected = [
            tuple(r[f] for f in fields) for r in selectors.concept_list_live(user=user, min_iou=t).values(*fields)[:50]
        ]

        def check_threshold(path, body, expected=expected):
            if [tuple(r[f] for f in fields) for r in body["results"]] != expected:
                raise SystemExit(f"{path}: the scope arrays disagree with the count over the units")

        measure_get(client, [f"/api/concepts/?min_iou={t}"], check=check_threshold)
    paths = [f"/api/concepts/?min_iou={thresholds[i % len(thresholds)]}" for i in range(4 * k)]
    rows.append(
        (
            "GET /api/concepts/?min_iou=T, T in " + ", ".join(map(str, thresholds)),
            measure_get(client, paths),
            "p95 < 30 ms",
        )
    )
    paths = [f"/api/concepts/?min_iou={thresholds[i % len(thresholds)]}&min_stability=0.9" for i in range(4 * k)]
    rows.append(
        ("GET /api/concepts/?min_iou=T&min_stability=0.9 (T as above)", measure_get(client, paths), "p95 < 30 ms")
    )
    rows.append(
        (
            "GET /api/concepts/?category=object&min_iou=0.1",
            measure_get(client, ["/api/concepts/?category=object&min_iou=0.1"] * k),
            "p95 < 30 ms",
        )
    )
    # The write side of the scope rows: a job's success rewrites its model's ConceptStat rows and
    # the scope rows of its bucket (the units of every model of that bucket).
    for public in (True, False):
        picked = list(NetworkModel.objects.filter(public=public, owner=user).order_by("id")[: max(3, k // 2)])
        refreshes = []
        for model in picked:
            t0 = time.perf_counter()
            services.concept_stats_refresh(model_id=model.pk)
            refreshes.append(time.perf_counter() - t0)
        rows.append(
            (
                f"concept_stats_refresh of one {'public' if public else 'private'} model (what job_succeed runs)",
                refreshes,
                "",
            )
        )

    # Bulk write: one 512-unit layer with the full unit x concept matrix, as a worker stores it.
    dataset = Dataset.objects.first()
    concepts = list(Concept.objects.order_by("id").values_list("name", "category"))
    writes, rewrites = [], []
    for i in range(args.writes):
        model = NetworkModel.objects.create(
            owner=user, name=f"write-{i}", arch="torchvision:resnet18", weights_path="/x", public=True
        )
        job = Job.objects.create(owner=user, type="dissect", model=model, dataset=dataset, status=Job.Status.RUNNING)
        iou = rng.gamma(1.2, 0.01, size=(args.units, len(concepts)))
        thresholds = rng.gamma(2.0, 1.0, size=args.units)
        u = args.units
        evidence = {
            "iou_low": iou.max(1) * 0.8,
            "iou_high": iou.max(1) * 1.2,
            "stability": rng.uniform(0, 1, u),
            "runner_up": rng.integers(0, len(concepts), u),
            "runner_up_iou": iou.max(1) * 0.9,
            "chance_iou": iou.max(1) * 0.2,
            "p_value": rng.uniform(0, 1, u),
            "low": (iou * 0.8).astype(np.float32),
            "high": (iou * 1.2).astype(np.float32),
        }
        top_images = rng.integers(0, 20000, size=(args.units, TOP_IMAGES)).tolist()
        for target in (writes, rewrites):
            t0 = time.perf_counter()
            stored = services.layer_result_store(
                job=job,
                layer="layer4.1",
                thresholds=thresholds,
                iou=iou,
                concepts=concepts,
                summary={"units": args.units},
                top_images=top_images,
                evidence=evidence,
            )
            target.append(time.perf_counter() - t0)
            assert stored == args.units
        assert Unit.objects.filter(job=job).count() == args.units
        assert UnitConcept.objects.filter(unit__job=job).count() == args.units * args.top
    rows.append(
        (
            f"layer_result_store: one {args.units}-unit layer x {len(concepts)} concepts, with evidence (first write)",
            writes,
            "< 1 s",
        )
    )
    rows.append(("layer_result_store: the same layer again (redelivery, replaces)", rewrites, "< 1 s"))
    rows.append((f"  (database vendor: {connection.vendor})", [], ""))


def print_table(rows, timings: dict, args) -> None:
    log("")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    log(f"machine: {os.cpu_count()} CPUs, load average {load} at the end (other processes share the CPUs)")
    log(
        f"store benchmark: {args.models} models x {args.layers} layers x {args.units} units, top {args.top} "
        f"concepts ({args.models * args.layers * args.units:,} units, "
        f"{args.models * args.layers * args.units * args.top:,} scores); Postgres database {args.db}"
    )
    if timings:
        log("")
        log(f"{'fill step':<58} {'seconds':>9}")
        for name, seconds in timings.items():
            log(f"{name:<58} {seconds:>9.1f}")
    log("")
    log(f"{'measurement':<78} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  target")
    for name, samples, target in rows:
        if not samples:
            log(name)
            continue
        p50, p95, worst = percentiles(samples)
        log(f"{name:<78} {len(samples):>4} {p50 * 1000:>8.1f} {p95 * 1000:>8.1f} {worst * 1000:>8.1f}  {target}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_store.py", description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=5, choices=range(1, len(LAYERS) + 1))
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--writes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", default="netdissect_bench")
    parser.add_argument("--admin-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--skip-fill", action="store_true", help="reuse a database filled by an earlier --keep run")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--tmp", default=None, help="folder for the temporary score file (default: system temp)")
    parser.add_argument(
        "--http-clients", type=int, default=8, help="concurrent clients of the HTTP unit query (0: skip it)"
    )
    parser.add_argument("--http-requests", type=int, default=1600, help="requests of the HTTP unit query, all clients")
    parser.add_argument("--http-workers", type=int, default=4, help="gunicorn worker processes for the HTTP query")
    parser.add_argument(
        "--http-threads", type=int, default=0, help="gunicorn threads per worker (gthread, keep-alive); 0: sync workers"
    )
    parser.add_argument(
        "--http-only", action="store_true", help="with --skip-fill: measure only the unit query over HTTP"
    )
    args = parser.parse_args()
    if args.http_only and not (args.skip_fill and args.http_clients):
        raise SystemExit("--http-only needs --skip-fill (a database kept by an earlier --keep run) and --http-clients")
    if args.db in PROTECTED:
        raise SystemExit(f"refusing to use database {args.db!r}")

    base = args.admin_url.rsplit("/", 1)[0]
    media = tempfile.mkdtemp(prefix="bench-store-media-")
    env = {
        **os.environ,
        "DATABASE_URL": f"{base}/{args.db}",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "MEDIA_ROOT": media,
        "VAR_DIR": str(Path(media) / "var"),
        "UNIT_TOP_CONCEPTS": str(args.top),
        "DEBUG": "false",
    }
    os.environ.update(env)
    timings: dict[str, float] = {}
    rows: list = []
    try:
        if not args.skip_fill:
            t0 = time.perf_counter()
            recreate_database(args.admin_url, args.db)
            migrate(env)
            timings["create database and migrate"] = time.perf_counter() - t0

        import django

        django.setup()
        if not args.skip_fill:
            t0 = time.perf_counter()
            fill(args, timings)
            timings["fill: total"] = time.perf_counter() - t0
            rebuild_concept_stats(timings)
        measure(args, rows)
    finally:
        from django.apps import apps

        if apps.ready:
            from django.db import connections

            connections.close_all()
        shutil.rmtree(media, ignore_errors=True)
        if not args.keep:
            drop_database(args.admin_url, args.db)
    print_table(rows, timings, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

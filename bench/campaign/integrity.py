"""After everything: every job final, and results whole, single and only where they belong.

Read straight from the private Postgres and the media folder, not through the API.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.campaign.harness import Harness

TOP_CONCEPTS = 5  # UNIT_TOP_CONCEPTS (every dataset and concept source here has more concepts)


def run(h: Harness) -> None:
    if h.media.mounted:
        h.log(
            f"media tmpfs: {(h.media.size_mb * 2**20 - h.media.free_bytes()) / 2**20:.0f} of {h.media.size_mb} MB used"
        )
    open_jobs = h.db_wait_all_final(timeout=h.options.drain_seconds)
    total = h.sql("SELECT status, count(*) FROM nd_job GROUP BY status ORDER BY status")
    h.add(
        "none stuck",
        "after all phases, waited for every job in the database (also those whose submission got no answer)",
        "no job left queued or running",
        f"jobs by status: {', '.join(f'{s} {n}' for s, n in total)}; "
        f"{len(open_jobs)} not final" + (f": {open_jobs[:5]}" if open_jobs else ""),
        not open_jobs,
    )
    no_reason = h.sql("SELECT id FROM nd_job WHERE status = 'failed' AND btrim(error) = ''")
    reasons: dict[str, int] = {}
    for (error,) in h.sql("SELECT error FROM nd_job WHERE status = 'failed'"):
        key = (error.strip().splitlines() or [""])[0][:70]
        reasons[key] = reasons.get(key, 0) + 1
    h.add(
        "failed jobs say why",
        "read the error of every failed job",
        "a non-empty reason on each",
        f"{sum(reasons.values())} failed, {len(no_reason)} without a reason; reasons: "
        + ("; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:4]) or "none"),
        not no_reason,
    )
    _results(h)


def _results(h: Harness) -> None:
    media = Path(h.media.path)
    layers_of = {
        pk: {e["name"]: e["units"] for e in (layers if isinstance(layers, list) else json.loads(layers))}
        for pk, layers in h.sql("SELECT id, layers FROM nd_model")
    }
    units = {
        (j, layer): (n, distinct, lo, hi)
        for j, layer, n, distinct, lo, hi in h.sql(
            "SELECT job_id, layer, count(*), count(DISTINCT unit), min(unit), max(unit) FROM nd_unit GROUP BY 1, 2"
        )
    }
    scores = {
        (j, layer): (n, bad)
        for j, layer, n, bad in h.sql(
            "SELECT u.job_id, u.layer, count(*), count(*) FILTER (WHERE uc.rank >= %s) FROM nd_unit_concept uc "
            "JOIN nd_unit u ON u.id = uc.unit_id GROUP BY 1, 2",
            (TOP_CONCEPTS,),
        )
    }
    results = {
        (j, layer): (n, units_count, path)
        for j, layer, n, units_count, path in h.sql(
            "SELECT job_id, layer, count(*), max(units), max(matrix_path) FROM nd_layer_result GROUP BY 1, 2"
        )
    }
    importance = dict(h.sql("SELECT job_id, count(*) FROM nd_class_unit_importance GROUP BY 1"))
    curves = dict(h.sql("SELECT job_id, count(*) FROM nd_ablation_curve GROUP BY 1"))
    jobs = h.sql("SELECT id, type, status, params, model_id FROM nd_job ORDER BY id")
    problems: list[str] = []
    checked_ok = checked_gone = 0
    for job_id, job_type, status, params, model_id in jobs:
        params = params if isinstance(params, dict) else json.loads(params)
        mine = {key for key in set(units) | set(results) if key[0] == job_id}
        if status == "succeeded" and job_type == "dissect":
            checked_ok += 1
            wanted = set(params.get("layers", []))
            extra = {layer for _, layer in mine} - wanted
            if extra:
                problems.append(f"job {job_id}: rows for layers {sorted(extra)} it did not dissect")
            for layer in sorted(wanted):
                n_units = layers_of[model_id].get(layer)
                got = units.get((job_id, layer))
                if got != (n_units, n_units, 0, n_units - 1):
                    problems.append(f"job {job_id} {layer}: units {got}, expected {n_units} distinct 0..{n_units - 1}")
                score = scores.get((job_id, layer))
                if score != (n_units * TOP_CONCEPTS, 0):
                    problems.append(f"job {job_id} {layer}: {score} scores, expected {n_units * TOP_CONCEPTS}")
                result = results.get((job_id, layer))
                if result is None or result[0] != 1 or result[1] != n_units:
                    problems.append(f"job {job_id} {layer}: layer results {result}, expected one of {n_units} units")
                elif not Path(result[2]).is_file():
                    problems.append(f"job {job_id} {layer}: matrix file {result[2]} missing")
            if (media / "work" / f"job-{job_id}").exists():
                problems.append(f"job {job_id}: shard work files left in work/job-{job_id}")
        elif status in ("failed", "cancelled"):
            checked_gone += 1
            if mine or importance.get(job_id) or curves.get(job_id):
                problems.append(
                    f"{status} job {job_id} kept results: {sorted(mine)[:3]}, "
                    f"{importance.get(job_id, 0)} importances, {curves.get(job_id, 0)} curves"
                )
            for folder in (media / "results" / f"job-{job_id}", media / "work" / f"job-{job_id}"):
                if folder.exists():
                    files = [p.name for p in folder.rglob("*") if p.is_file()]
                    problems.append(
                        f"{status} job {job_id} left {len(files)} files in {folder.relative_to(media)}"
                        + (f" ({files[:2]})" if files else "")
                    )
    h.add(
        "no duplicate or partial results",
        f"per job in the database: {checked_ok} succeeded dissections (units, top-{TOP_CONCEPTS} scores, layer "
        f"results, matrix files) and {checked_gone} failed or cancelled jobs (rows and files under the media)",
        "succeeded: one unit row per unit of each dissected layer (0..U-1), U x 5 scores, one layer result, its "
        "matrix file, no shard files; failed or cancelled: no unit, layer, importance or curve rows and no files",
        f"{len(problems)} problems" + (f": {'; '.join(problems[:4])}" if problems else ""),
        not problems and checked_ok > 0,
    )
    _uploads(h)


def _uploads(h: Harness) -> None:
    """Every upload folder under the media belongs to a registered model or dataset."""
    media = Path(h.media.path)
    kept = [row[0] for row in h.sql("SELECT weights_path FROM nd_model UNION ALL SELECT path FROM nd_dataset")]
    orphans = []
    for kind in ("models", "datasets"):
        for folder in sorted((media / "uploads" / kind).glob("*")):
            if not any(path.startswith(str(folder) + "/") or path == str(folder) for path in kept):
                orphans.append(str(folder.relative_to(media)))
    h.add(
        "nothing left behind by refused uploads",
        "compared every folder under media/uploads with the registered models and datasets",
        "each belongs to a registered model or dataset",
        f"{len(orphans)} orphan folders" + (f": {orphans[:3]}" if orphans else ""),
        not orphans,
    )

"""Write paths, one module per concern. Every change to models, datasets, jobs and results goes
through here; callers import from ``api.services``.

- ``registration``: models, datasets, API tokens;
- ``jobs``: a job's life (create, start, progress, succeed, fail, cancel, stage);
- ``results``: units, scores, matrices, ablation rows;
- ``concepts``: the concept summaries (per model, per scope; ``concept_cells``: the IoU cells);
- ``shards``: the shards of a big dissection;
- ``recovery``: worker heartbeats, jobs and shards of dead workers, lost messages;
- ``painting``: Figure 6 edits on the interactive queue;
- ``queue``: sending tasks to the workers by name.
"""

from api.services.concepts import concept_scopes_rebuild, concept_scopes_refresh, concept_stats_refresh
from api.services.jobs import (
    GENERATOR_JOBS,
    drop_results,
    job_cancel,
    job_create,
    job_fail,
    job_leftovers_remove,
    job_notes_set,
    job_progress,
    job_stage_set,
    job_start,
    job_succeed,
    job_summary_store,
)
from api.services.painting import generator_paint
from api.services.recovery import jobs_recover_stale, jobs_requeue_lost, worker_gone, worker_heartbeat
from api.services.registration import dataset_register, model_register, token_get_or_create
from api.services.results import (
    ablation_store,
    concepts_ensure,
    layer_result_store,
    unit_audiences_repair,
    unit_pages_fill,
)
from api.services.shards import (
    SHARD_STAGE_SHARE,
    ShardBusy,
    shard_done,
    shard_progress,
    shard_start,
    shards_create,
    shards_recover_stale,
    shards_requeue_unfinished,
)
from api.services.webhooks import deliveries_resend_due, secret_of, secret_rotate

__all__ = [
    "GENERATOR_JOBS",
    "SHARD_STAGE_SHARE",
    "ShardBusy",
    "ablation_store",
    "concept_scopes_rebuild",
    "concept_scopes_refresh",
    "concept_stats_refresh",
    "concepts_ensure",
    "dataset_register",
    "deliveries_resend_due",
    "drop_results",
    "generator_paint",
    "job_cancel",
    "job_create",
    "job_fail",
    "job_leftovers_remove",
    "job_notes_set",
    "job_progress",
    "job_stage_set",
    "job_start",
    "job_succeed",
    "job_summary_store",
    "jobs_recover_stale",
    "jobs_requeue_lost",
    "layer_result_store",
    "model_register",
    "secret_of",
    "secret_rotate",
    "shard_done",
    "shard_progress",
    "shard_start",
    "shards_create",
    "shards_recover_stale",
    "shards_requeue_unfinished",
    "token_get_or_create",
    "unit_audiences_repair",
    "unit_pages_fill",
    "worker_gone",
    "worker_heartbeat",
]

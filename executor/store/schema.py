"""The database schema (SQLAlchemy Core); Alembic migrations in store/migrations/ create it."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum, StrEnum

import sqlalchemy as sa

# A naming convention makes constraint names stable, so Alembic batch migrations on SQLite
# (which rebuild tables) and PostgreSQL agree on them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # every item reached done, failed or invalid
    FAILED = "failed"  # the job itself could not run (e.g. the model would not load at all)
    CANCELLED = "cancelled"


class ItemStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"  # claimed under a lease
    DONE = "done"
    FAILED = "failed"  # generation failed (prompt too long, crashed the worker N times, ...)
    INVALID = "invalid"  # the input line itself was bad (--skip-invalid); never retried
    CANCELLED = "cancelled"


def utcnow() -> datetime:
    """Now, in UTC, without tzinfo: SQLite stores naive datetimes, so we store UTC throughout."""
    return datetime.now(UTC).replace(tzinfo=None)


def _status(enum: type[Enum], name: str) -> sa.Enum:
    # Stored as plain strings with a CHECK constraint: portable, and no native ENUM to migrate.
    return sa.Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("input_path", sa.Text, nullable=False),
    sa.Column("input_sha256", sa.String(64), nullable=False),
    # sha256 over input content, model and params: the same submission finds the same job.
    sa.Column("fingerprint", sa.String(64), nullable=False, index=True),
    sa.Column("status", _status(JobStatus, "job_status"), nullable=False),
    sa.Column("item_count", sa.Integer, nullable=False),
    # Only workers whose GPU has at least this much memory take the job (None: any).
    sa.Column("min_vram", sa.BigInteger, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=True),
    sa.Column("finished_at", sa.DateTime, nullable=True),
    # Energy the worker's device used while working on the job (NVML's total-energy counter,
    # or RAPL on the CPU), summed over its batches; NULL: not measured.
    sa.Column("energy_mj", sa.BigInteger, nullable=True),
    sa.Column("energy_source", sa.String(32), nullable=True),  # "nvml:GPU-…", "rapl"
    # Higher runs first (submit --priority, `executor priority`); 0 by default.
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    # The hours the job may run in, local time ("22:00-07:00"; None: any time).
    sa.Column("window", sa.String(200), nullable=True),
)

items = sa.Table(
    "items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("line", sa.Integer, nullable=False),
    sa.Column("custom_id", sa.String(512), nullable=False),
    # {"prompt": str} or {"messages": [...]}, plus per-line overrides under "params";
    # for an invalid line {"raw": the line as read}.
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("status", _status(ItemStatus, "item_status"), nullable=False),
    # Attempts that ended with the model process crashing on this item (poison detection).
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # Tokens its sequence needs: prompt (as the model tokenizes it) + max_tokens. Counted
    # before the job's first load, so the context can be sized from the work.
    sa.Column("context_need", sa.Integer, nullable=True),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_until", sa.DateTime, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    # What kind of failure (ItemError): how OpenAI's batch output states it (400 or 500).
    sa.Column("error_code", sa.String(40), nullable=True),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Index("ix_items_job_line", "job_id", "line"),
    sa.Index("ix_items_status_job", "status", "job_id", "id"),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "item_id",
        sa.Integer,
        sa.ForeignKey("items.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,  # exactly one result per item, whatever crashes happen
    ),
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("finish_reason", sa.String(32), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("prompt_ms", sa.Float, nullable=True),  # prompt evaluation (llama.cpp's timer)
    sa.Column("generation_ms", sa.Float, nullable=True),  # token generation
    sa.Column("total_ms", sa.Float, nullable=False),  # wall time in the model process
    sa.Column("model_sha256", sa.String(64), nullable=False),
    # The generation parameters the item ran with (job defaults + its line's own).
    sa.Column("params", sa.JSON, nullable=True),
    sa.Column("worker_id", sa.String(200), nullable=True),
    # The model load (plan, layers, measured VRAM) this result ran under.
    sa.Column("load_id", sa.Integer, sa.ForeignKey("loads.id", ondelete="SET NULL"), nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

# sha256 of model files, keyed by path, size and mtime: hashing a 64 GB GGUF takes minutes.
model_files = sa.Table(
    "model_files",
    metadata,
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime_ns", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("hashed_at", sa.DateTime, nullable=False),
)


class LoadOutcome(StrEnum):
    LOADING = "loading"
    LOADED = "loaded"  # up and serving (ended_at set when it was stopped normally)
    OOM = "oom"  # out of memory, at load or during decode
    OVER_CAP = "over_cap"  # loaded, but NVML measured more VRAM than the cap
    CRASHED = "crashed"  # the model process died for another reason
    FAILED = "failed"  # could not load for a reason shrinking does not help


# One row per attempt to load a model: the plan, the layers, what NVML measured, the outcome.
loads = sa.Table(
    "loads",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("worker_id", sa.String(200), nullable=False),
    sa.Column("model_path", sa.Text, nullable=False),
    sa.Column("model_sha256", sa.String(64), nullable=False),
    sa.Column("gpu_uuid", sa.String(100), nullable=False),  # "cpu" without a GPU
    sa.Column("gpu_name", sa.String(200), nullable=True),
    sa.Column("cap_setting", sa.String(32), nullable=False),  # as the user wrote it, "" if none
    sa.Column("vram_cap", sa.BigInteger, nullable=True),  # the cap that applied, in bytes
    sa.Column("n_ctx", sa.Integer, nullable=False),
    sa.Column("parallel", sa.Integer, nullable=False),
    sa.Column("n_ubatch", sa.Integer, nullable=False, server_default="512"),
    sa.Column("n_gpu_layers", sa.Integer, nullable=False),
    # The whole placement (plan.Placement.as_dict) and its llama.cpp -ot rules.
    sa.Column("placement", sa.JSON, nullable=True),
    sa.Column("tensor_overrides", sa.JSON, nullable=True),
    sa.Column("predicted_vram", sa.BigInteger, nullable=True),
    sa.Column("measured_vram", sa.BigInteger, nullable=True),
    sa.Column("plan", sa.JSON, nullable=True),
    sa.Column("outcome", _status(LoadOutcome, "load_outcome"), nullable=False),
    sa.Column("cause", sa.Text, nullable=True),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("ended_at", sa.DateTime, nullable=True),
    sa.Index(
        "ix_loads_config",
        "model_sha256",
        "gpu_uuid",
        "cap_setting",
        "n_ctx",
        "parallel",
        "n_ubatch",
    ),
)

# The placement that last loaded and served on a configuration; the next plan starts there.
known_configs = sa.Table(
    "known_configs",
    metadata,
    sa.Column("model_sha256", sa.String(64), primary_key=True),
    sa.Column("gpu_uuid", sa.String(100), primary_key=True),
    sa.Column("cap_setting", sa.String(32), primary_key=True),
    sa.Column("n_ctx", sa.Integer, primary_key=True),
    sa.Column("parallel", sa.Integer, primary_key=True),
    sa.Column("n_ubatch", sa.Integer, primary_key=True),
    sa.Column("n_gpu_layers", sa.Integer, nullable=False),
    sa.Column("placement", sa.JSON, nullable=True),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)


# Decode tokens/s at 1, 2, 4, … sequences per step, measured by a CPU load with
# --parallel auto (executor.engine.decode_rates); {"1": 95.0, "2": 128.0, …}.
decode_rates = sa.Table(
    "decode_rates",
    metadata,
    sa.Column("model_sha256", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(200), primary_key=True),
    sa.Column("threads", sa.Integer, primary_key=True),
    sa.Column("rates", sa.JSON, nullable=False),
    sa.Column("measured_at", sa.DateTime, nullable=False),
)


# One row per worker identity (host + GPU): registration and heartbeat, for `executor workers`.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),  # "host:GPU-uuid" or "host:cpu"
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("gpu_uuid", sa.String(100), nullable=False),
    sa.Column("gpu_name", sa.String(200), nullable=True),
    sa.Column("vram_total", sa.BigInteger, nullable=True),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("model", sa.Text, nullable=True),  # the model loaded now
    sa.Column("job_id", sa.Integer, nullable=True),  # the job worked on now
    sa.Column("tokens_per_s", sa.Float, nullable=True),
    # The items in flight in its model process now: tokens generated so far, and how far
    # along they are in items (each counts generated / max_tokens), for live tok/s and ETA.
    sa.Column("tokens_in_flight", sa.Integer, nullable=True),
    sa.Column("items_in_flight", sa.Float, nullable=True),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("heartbeat_at", sa.DateTime, nullable=False),
    sa.Column("stopped_at", sa.DateTime, nullable=True),
    # What it does now when not working: "outside its window", "paused", "yielding the GPU
    # to pid 4242"; and when it expects to resume (None: when told, or unknown).
    sa.Column("state", sa.String(200), nullable=True),
    sa.Column("resumes_at", sa.DateTime, nullable=True),
    # The scheduler that started it: "slurm job 4242 task 3", "kubernetes pod w-0".
    sa.Column("scheduler", sa.String(200), nullable=True),
)

# `executor pause`: workers matching a target ("*", a worker id, or a host) stop working,
# unload, and wait until `executor resume` deletes the row.
pauses = sa.Table(
    "pauses",
    metadata,
    sa.Column("target", sa.String(200), primary_key=True),
    sa.Column("paused_at", sa.DateTime, nullable=False),
)


# Completion tokens a worker has generated on a job so far (finished and in flight), sampled
# every few seconds: the status page's tok/s over time, even while the first wave of a job
# decodes and nothing has finished yet.
rate_samples = sa.Table(
    "rate_samples",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("worker_id", sa.String(200), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),
    sa.Index("ix_rate_samples_job", "job_id", "id"),
)


# Files uploaded through `executor serve` (OpenAI's Files API): the bytes live in the data
# folder under a name made from `id`, never from anything a client sent.
api_files = sa.Table(
    "api_files",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("public_id", sa.String(64), nullable=False, unique=True),  # "file-…"
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),  # batch, batch_output
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
)

# Batches created through `executor serve` (OpenAI's Batch API): each runs as one job once
# its input file validates; its status is read from the job's.
api_batches = sa.Table(
    "api_batches",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("public_id", sa.String(64), nullable=False, unique=True),  # "batch_…"
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
    # validating, failed, submitted, cancelling, cancelled (cancelled before it had a job)
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("errors", sa.JSON, nullable=True),  # OpenAI's errors.data when validation failed
    sa.Column("output_file_id", sa.String(64), nullable=True),
    sa.Column("error_file_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("failed_at", sa.DateTime, nullable=True),
    sa.Column("cancelling_at", sa.DateTime, nullable=True),
    sa.Column("finalizing_at", sa.DateTime, nullable=True),
    # A server validating or finalizing the batch holds it until then: two servers on one
    # database never do the same step twice, and a step cut short is taken up again after.
    sa.Column("lease_until", sa.DateTime, nullable=True),
)

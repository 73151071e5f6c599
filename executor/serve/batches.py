"""OpenAI's Batch and File objects over executor's jobs: what `executor serve` answers.

A batch is validated while `POST /v1/batches` answers (its input file submitted as a job,
every line checked as `executor submit` checks it), so a worker started right after finds
its job; it is run by whatever `executor run` workers drain the database, and finalized by
the server's housekeeping thread once its job has finished: the output and error files are
written with the OpenAI export and become files of their own. Its status:

    validating → in_progress (queued or running) → finalizing → completed
               → failed (a bad input file, or a model that would not load)
    validating, in_progress, finalizing → cancelling (cancel asked) → cancelled

A request the model cannot serve (n > 1, an unknown model, a parameter out of range, a
prompt longer than the context) is answered alone in the error file, as OpenAI does; only a
file OpenAI would refuse (not JSON, a bad envelope, another endpoint, a duplicate custom_id)
fails the batch. Validating and finalizing are each held by one server at a time (a lease
on the batch): two servers on one database never write a batch's output twice, and a step
cut short (a full disk, a server killed) is taken up again.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from executor.config import Settings
from executor.errors import ExecutorError, InputError
from executor.jobs.export import export_job
from executor.jobs.openai_batch import URLS
from executor.jobs.status import job_rows
from executor.jobs.submit import submit
from executor.serve.files import FileStore
from executor.store import Database, queue
from executor.store import api as store
from executor.store.api import ApiBatch, ApiFile
from executor.store.schema import JobStatus, utcnow

log = logging.getLogger(__name__)

WINDOWS = ("24h",)
VALIDATE_SECONDS = 600.0  # a validation not finished by then (its server died) is taken up
FINALIZE_SECONDS = 600.0  # the same for writing the output files
RETRY_SECONDS = 30.0  # after a failed finalization (a full disk), try again this much later


class ApiError(Exception):
    """An error OpenAI's way: HTTP status, message, type, param and code."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        kind = kind if self.status < 500 else "server_error"
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }


def _ts(value: datetime | None) -> int | None:
    """Unix seconds of the store's naive-UTC times."""
    if value is None:
        return None
    return int((value - datetime(1970, 1, 1)).total_seconds())


def file_object(f: ApiFile) -> dict[str, Any]:
    return {
        "id": f.public_id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": _ts(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def create_batch(
    db: Database,
    settings: Settings,
    files: FileStore,
    body: dict[str, Any],
) -> ApiBatch:
    """Check the request as OpenAI does, then validate the file's lines before answering:
    when this returns, the batch is in_progress with its job queued (or failed)."""
    unknown = sorted(
        set(body)
        - {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
    )
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}", param=unknown[0])
    input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    window, metadata = body.get("completion_window"), body.get("metadata")
    if not isinstance(input_file_id, str) or store.get_file(db, input_file_id) is None:
        raise ApiError(
            404, f"No such File object: {str(input_file_id)[:64]}", param="input_file_id"
        )
    if endpoint not in URLS:
        raise ApiError(400, f"endpoint must be one of {', '.join(URLS)}", param="endpoint")
    if window not in WINDOWS:
        raise ApiError(400, "completion_window must be 24h", param="completion_window")
    if metadata is not None and not _good_metadata(metadata):
        raise ApiError(
            400,
            "metadata: at most 16 string pairs (keys ≤ 64, values ≤ 512 chars)",
            param="metadata",
        )
    _priority(metadata)  # checked before anything is stored
    batch = store.create_batch(
        db,
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=window,
        metadata=metadata,
        lease_seconds=VALIDATE_SECONDS,
    )
    validate(db, settings, files, batch)
    found = store.get_batch(db, batch.public_id)
    assert found is not None
    return found


def _priority(metadata: dict[str, str] | None) -> int:
    """metadata.priority, an integer as text (OpenAI's metadata values are strings): the
    job's priority, higher first; 0 without one."""
    text = (metadata or {}).get("priority")
    if text is None:
        return 0
    try:
        return int(text)
    except ValueError:
        raise ApiError(
            400, f"metadata.priority must be an integer, got {text[:32]!r}", param="metadata"
        ) from None


def _good_metadata(metadata: Any) -> bool:
    return (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in metadata.items()
        )
    )


def batch_object(db: Database, batch: ApiBatch) -> dict[str, Any]:
    """The Batch object for `batch`, its status read from its job."""
    job = queue.get_job(db, batch.job_id) if batch.job_id is not None else None
    counts = {"total": 0, "completed": 0, "failed": 0}
    status = {
        "validating": "validating",
        "failed": "failed",
        "cancelled": "cancelled",
        "cancelling": "cancelling",
    }.get(batch.state, "in_progress")
    errors = batch.errors
    in_progress_at = completed_at = cancelled_at = None
    failed_at = _ts(batch.failed_at)
    if batch.state == "cancelled":
        cancelled_at = _ts(batch.cancelling_at)
    if job is not None:
        (row,) = job_rows(db, job.id)
        c = row["counts"]
        counts = {
            "total": job.item_count,
            "completed": c["done"],
            "failed": c["failed"] + c["invalid"],
        }
        in_progress_at = _ts(job.created_at)
        if job.status == JobStatus.FAILED:
            status, failed_at = "failed", _ts(job.finished_at)
            errors = [{"code": "model_error", "message": job.error, "line": None, "param": None}]
        elif batch.state == "cancelling" or job.status == JobStatus.CANCELLED:
            status = "cancelled" if batch.output_file_id else "cancelling"
            if status == "cancelled":
                cancelled_at = _ts(job.finished_at)
        elif job.status == JobStatus.DONE:
            status = "completed" if batch.output_file_id else "finalizing"
            completed_at = _ts(job.finished_at) if status == "completed" else None
    created = _ts(batch.created_at) or 0
    return {
        "id": batch.public_id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None if not errors else {"object": "list", "data": errors},
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": created,
        "in_progress_at": in_progress_at,
        "expires_at": created + 24 * 3600,
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": completed_at,
        "failed_at": failed_at,
        "expired_at": None,
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": cancelled_at,
        "request_counts": counts,
        "metadata": batch.metadata,
        "model": job.model.rsplit("/", 1)[-1] if job else None,
    }


def cancel(db: Database, batch: ApiBatch) -> ApiBatch:
    """Cancel a batch that is validating, in progress or finalizing, as OpenAI does: queued
    items are cancelled at once (running ones finish but are not kept) and the output file
    holds what was done. A batch still validating becomes cancelled when its validation
    ends (its job, if it made one, is cancelled before any item runs). Cancelling twice is
    harmless (the batch as it is); a completed, failed or expired batch is a 400."""
    status = batch_object(db, batch)["status"]
    if status in ("completed", "failed", "expired"):
        raise ApiError(400, f"Cannot cancel a batch with status '{status}'.")
    now = utcnow()
    if batch.state == "validating":
        store.update_batch(
            db, batch.id, only_state="validating", state="cancelling", cancelling_at=now
        )
    elif batch.state == "submitted" and store.update_batch(
        db, batch.id, only_state="submitted", state="cancelling", cancelling_at=now
    ):
        job = queue.get_job(db, batch.job_id) if batch.job_id is not None else None
        if job is not None and job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            queue.cancel_job(db, job.id)
    found = store.get_batch(db, batch.public_id)
    assert found is not None
    return found


# --- validating ----------------------------------------------------------------------------


def validate(db: Database, settings: Settings, files: FileStore, batch: ApiBatch) -> None:
    """Submit the batch's input file as a job, or fail the batch with the lines' errors.
    The caller holds the batch (its creation, or `store.take_batch`)."""
    source = store.get_file(db, batch.input_file_id)
    if source is None:
        _fail(db, batch, [_error("file_not_found", f"input file {batch.input_file_id} is gone")])
        return
    path = files.path(source.id)
    try:
        wrong = _other_endpoint(path, batch.endpoint)
        if wrong:
            _fail(db, batch, wrong)
            return
        # Idempotent per batch: a server stopped between this and the state change below
        # finds the same job when it validates the batch again.
        done = submit(
            settings, db, str(path), name=f"{batch.public_id} ({source.filename})"[:200],
            origin=batch.public_id, display=source.filename, refuse_requests=True,
            priority=_priority(batch.metadata),
        )  # fmt: skip
    except OSError as exc:
        log.error("batch %s: its input file cannot be read: %s", batch.public_id, exc)
        _fail(db, batch, [_error("file_not_found", _missing(source))])
        return
    except InputError as exc:
        errors = [_line_error(p, source.filename) for p in exc.problems[:1000]]
        _fail(db, batch, errors or [_error("invalid_file", _hide(str(exc), path, source))])
        return
    except ExecutorError as exc:
        _fail(db, batch, [_error("invalid_file", _hide(str(exc), path, source))])
        return
    _submitted(db, batch, done.job_id)


def _submitted(db: Database, batch: ApiBatch, job_id: int) -> None:
    if store.update_batch(
        db, batch.id, only_state="validating", state="submitted", job_id=job_id, lease_until=None
    ):
        return
    # Cancelled while it validated: its job is cancelled before any item runs.
    store.update_batch(db, batch.id, only_state="cancelling", job_id=job_id, lease_until=None)
    queue.cancel_job(db, job_id)


def _fail(db: Database, batch: ApiBatch, errors: list[dict[str, Any]]) -> None:
    now = utcnow()
    if not store.update_batch(
        db, batch.id, only_state="validating", state="failed", errors=errors, failed_at=now,
        lease_until=None,
    ):  # fmt: skip
        # Cancelled while it validated, and there is nothing to run: cancelled.
        store.update_batch(
            db, batch.id, only_state="cancelling", state="cancelled", lease_until=None
        )


def _missing(source: ApiFile) -> str:
    return (
        f"the content of input file {source.public_id} ({source.filename}) is missing on "
        "the server; upload the file again and create a new batch"
    )


def _hide(message: str, path: Path, source: ApiFile) -> str:
    """A message without the server's own paths."""
    return message.replace(str(path.resolve()), source.filename).replace(str(path), source.filename)


def _error(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _line_error(problem: str, display: str) -> dict[str, Any]:
    """`FILE:LINE: reason` as OpenAI's error (the line number apart)."""
    number, _, reason = problem.removeprefix(f"{display}:").partition(": ")
    if number.isdigit():
        return _error("invalid_request", reason, int(number))
    return _error("invalid_request", problem.removeprefix(f"{display}: "))


def _other_endpoint(path: Path, endpoint: str) -> list[dict[str, Any]]:
    """Lines whose url is not the batch's endpoint (OpenAI refuses such files); the other
    checks are submit's."""
    wrong = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if b'"url"' not in line:
                continue
            try:
                url = json.loads(line).get("url")
            except (ValueError, AttributeError, RecursionError):
                continue  # submit names it
            if isinstance(url, str) and url in URLS and url != endpoint:
                wrong.append(
                    _error(
                        "mismatched_endpoint",
                        f"the line's url {url} is not the batch's endpoint {endpoint}",
                        number,
                    )
                )
                if len(wrong) >= 100:
                    break
    return wrong


# --- finalizing ----------------------------------------------------------------------------


def finalize(db: Database, files: FileStore, batch: ApiBatch) -> bool:
    """Write the finished job's output (and error) file with the OpenAI export, if this
    server wins the batch. The files become visible together with the batch's pointers to
    them (one transaction); a failure (a full disk) leaves no row or bytes behind and the
    batch `finalizing`, taken up again after RETRY_SECONDS. True if files were written."""
    assert batch.job_id is not None
    if not store.take_batch(
        db, batch.id, states=("submitted", "cancelling"), lease_seconds=FINALIZE_SECONDS,
        finalizing_at=batch.finalizing_at or utcnow(),
    ):  # fmt: skip
        return False  # another server has it, or has written it
    out = store.reserve_file(db, filename=f"{batch.public_id}_output.jsonl", purpose="batch_output")
    err = store.reserve_file(db, filename=f"{batch.public_id}_error.jsonl", purpose="batch_output")
    try:
        files.ensure()
        exported = export_job(
            db, batch.job_id, str(files.path(out.id)), fmt="openai", errors=str(files.path(err.id))
        )
        errors = (err.id, files.path(err.id).stat().st_size) if exported.failed else None
        written = store.finish_batch_files(
            db, batch.id, (out.id, files.path(out.id).stat().st_size), errors
        )
    except (OSError, ExecutorError) as exc:
        _discard(db, files, out.id, err.id)
        store.update_batch(db, batch.id, lease_until=utcnow() + timedelta(seconds=RETRY_SECONDS))
        log.error(
            "batch %s: writing its output failed (%s); trying again in %gs",
            batch.public_id,
            getattr(exc, "strerror", None) or exc,
            RETRY_SECONDS,
        )
        return False
    if not written:  # another server finished it while this one wrote (its lease ran out)
        _discard(db, files, out.id, err.id)
        return False
    if not exported.failed:
        _discard(db, files, err.id)
    return True


def _discard(db: Database, files: FileStore, *row_ids: int) -> None:
    for row_id in row_ids:
        files.remove(row_id)
        store.drop_file(db, row_id)


# --- the housekeeping thread ------------------------------------------------------------------


def housekeeping(db: Database, settings: Settings, files: FileStore) -> int:
    """One round: validate batches whose validation was cut short, finalize finished ones,
    forget files a stopped server left half-written. Each batch fails or waits alone: one
    that cannot be handled never holds up the others. Returns how many moved."""
    moved = 0
    for batch in store.batches_in_state(db, "validating", "cancelling", free=True):
        if batch.state == "cancelling" and batch.job_id is not None:
            continue  # finalized below once its job has stopped
        moved += _one(batch, "validating", lambda b: _revalidate(db, settings, files, b))
    submitted = store.batches_in_state(db, "submitted", "cancelling", free=True)
    finished = []
    for batch in submitted:
        job = queue.get_job(db, batch.job_id) if batch.job_id is not None else None
        if job is not None and job.status in (JobStatus.DONE, JobStatus.CANCELLED):
            finished.append(job.id)
    for batch in store.batches_to_finalize(db, finished):
        moved += _one(batch, "finalizing", lambda b: finalize(db, files, b))
    for row_id in store.stale_reservations(db, "batch_output", FINALIZE_SECONDS):
        files.remove(row_id)
    return moved


def _revalidate(db: Database, settings: Settings, files: FileStore, batch: ApiBatch) -> bool:
    """Take up a batch whose validation was cut short (its server stopped), or one cancelled
    while nobody validated it."""
    if batch.state == "cancelling":
        return store.update_batch(
            db, batch.id, only_state="cancelling", state="cancelled", lease_until=None
        )
    if not store.take_batch(db, batch.id, states=("validating",), lease_seconds=VALIDATE_SECONDS):
        return False
    validate(db, settings, files, batch)
    return True


def _one(batch: ApiBatch, step: str, work: Any) -> int:
    """Run one batch's step; an error is that batch's alone (said in one line)."""
    try:
        return int(bool(work(batch)))
    except Exception as exc:
        log.error("batch %s: %s failed: %s: %s", batch.public_id, step, type(exc).__name__, exc)
        return 0

"""OpenAI's Batch and File objects over executor's jobs: what `executor serve` answers.

A batch is validated (its input file submitted as a job, every line checked as `executor
submit` checks it) by the server's housekeeping thread, run by whatever `executor run`
workers drain the database, and finalized by the same thread once its job has finished:
the output and error files are written with the OpenAI export and become files of their
own. Its status is read from the job's:

    validating → in_progress (queued or running) → finalizing → completed
               → failed (a bad input file, or a model that would not load)
    in_progress → cancelling (cancel asked) → cancelled (with what was done)
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from executor.config import Settings
from executor.errors import ExecutorError, InputError
from executor.export import export_job
from executor.openai_batch import URLS
from executor.serve.files import FileStore
from executor.status import job_rows
from executor.store import Database, queue
from executor.store import api as store
from executor.store.api import ApiBatch, ApiFile
from executor.store.schema import JobStatus, utcnow
from executor.submit import submit

log = logging.getLogger(__name__)

WINDOWS = ("24h",)
_LINE = re.compile(r":(\d+): (.*)$")


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
    db: Database, input_file_id: Any, endpoint: Any, window: Any, metadata: Any
) -> ApiBatch:
    """Check the request as OpenAI does; the file's lines are checked after (validating)."""
    if not isinstance(input_file_id, str) or store.get_file(db, input_file_id) is None:
        raise ApiError(404, f"No such File object: {input_file_id}", param="input_file_id")
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
    return store.create_batch(
        db,
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=window,
        metadata=metadata,
    )


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
    status = {"validating": "validating", "failed": "failed"}.get(batch.state, "in_progress")
    errors = batch.errors
    in_progress_at = completed_at = cancelled_at = failed_at = None
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
    elif batch.state == "failed":
        failed_at = _ts(batch.failed_at)
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
    """Cancel a batch: queued items are cancelled at once (running ones finish but are not
    kept); the output file then holds what was done. Cancelling twice is harmless."""
    if batch.state == "validating":
        raise ApiError(400, "the batch is still validating; cancel it in a moment")
    if batch.state == "submitted" and batch.job_id is not None:
        job = queue.get_job(db, batch.job_id)
        running = job is not None and job.status in (JobStatus.QUEUED, JobStatus.RUNNING)
        if running and store.update_batch(
            db, batch.id, only_state="submitted", state="cancelling", cancelling_at=utcnow()
        ):
            queue.cancel_job(db, batch.job_id)
    found = store.get_batch(db, batch.public_id)
    assert found is not None
    return found


# --- the housekeeping thread ------------------------------------------------------------------


def validate(db: Database, settings: Settings, files: FileStore, batch: ApiBatch) -> None:
    """Submit the batch's input file as a job, or fail the batch with the lines' errors."""
    source = store.get_file(db, batch.input_file_id)
    if source is None:
        _fail(db, batch, [_error("file_not_found", f"input file {batch.input_file_id} is gone")])
        return
    path = files.path(source.id)
    wrong = _other_endpoint(path, batch.endpoint)
    if wrong:
        _fail(db, batch, wrong)
        return
    try:
        # Idempotent per batch: a server stopped between this and the state change below
        # finds the same job when it validates the batch again.
        done = submit(
            settings, db, str(path), name=f"{batch.public_id} ({source.filename})"[:200],
            origin=batch.public_id,
        )  # fmt: skip
    except InputError as exc:
        errors = [_line_error(p) for p in exc.problems[:1000]] or [_error("invalid_file", str(exc))]
        _fail(db, batch, errors)
        return
    except ExecutorError as exc:
        _fail(db, batch, [_error("invalid_file", str(exc).replace(str(path), source.filename))])
        return
    store.update_batch(db, batch.id, only_state="validating", state="submitted", job_id=done.job_id)


def finalize(db: Database, files: FileStore, batch: ApiBatch) -> None:
    """Write the finished job's output (and error) file with the OpenAI export."""
    assert batch.job_id is not None
    if not store.update_batch(db, batch.id, finalizing_at=utcnow()):
        return
    ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
    out = store.reserve_file(db, filename=f"{batch.public_id}_output.jsonl", purpose="batch_output")
    err = store.reserve_file(db, filename=f"{batch.public_id}_error.jsonl", purpose="batch_output")
    files.ensure()
    exported = export_job(
        db, batch.job_id, str(files.path(out.id)), fmt="openai", errors=str(files.path(err.id))
    )
    store.finish_file(db, out.id, files.path(out.id).stat().st_size)
    ids["output_file_id"] = out.public_id
    if exported.failed:
        store.finish_file(db, err.id, files.path(err.id).stat().st_size)
        ids["error_file_id"] = err.public_id
    else:
        store.drop_file(db, err.id)
        files.remove(err.id)
    store.update_batch(db, batch.id, **ids)


def housekeeping(db: Database, settings: Settings, files: FileStore) -> int:
    """One round: validate new batches, finalize finished ones. Returns how many moved."""
    moved = 0
    for batch in store.batches_in_state(db, "validating"):
        validate(db, settings, files, batch)
        moved += 1
    submitted = store.batches_in_state(db, "submitted", "cancelling")
    finished = []
    for batch in submitted:
        job = queue.get_job(db, batch.job_id) if batch.job_id is not None else None
        if job is not None and job.status in (JobStatus.DONE, JobStatus.CANCELLED):
            finished.append(job.id)
    for batch in store.batches_to_finalize(db, finished):
        try:
            finalize(db, files, batch)
        except ExecutorError as exc:
            log.error("batch %s: writing its output failed: %s", batch.public_id, exc)
        moved += 1
    return moved


def _fail(db: Database, batch: ApiBatch, errors: list[dict[str, Any]]) -> None:
    store.update_batch(
        db, batch.id, only_state="validating", state="failed", errors=errors, failed_at=utcnow()
    )


def _error(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _line_error(problem: str) -> dict[str, Any]:
    """`FILE:LINE: reason` (the path is the server's own: not shown) as OpenAI's error."""
    found = _LINE.search(problem)
    if found:
        return _error("invalid_request", found[2], int(found[1]))
    return _error("invalid_request", problem.rsplit(": ", 1)[-1])


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

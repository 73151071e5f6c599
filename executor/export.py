"""Exporting results as JSON lines in input order, atomically (no half-written files)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from executor.errors import NotFoundError
from executor.store import Database, queue
from executor.store.schema import ItemStatus

NOT_DONE = (ItemStatus.FAILED, ItemStatus.INVALID, ItemStatus.CANCELLED)


@dataclass(frozen=True)
class Exported:
    job_id: int
    lines: int
    item_count: int
    job_status: str


def export_job(
    db: Database, job_id: int, output: str | None = None, *, include_failed: bool = False
) -> Exported:
    """Write one line per item (done, and with `include_failed` failed ones) to `output`."""
    job = queue.get_job(db, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}", hint="`executor status` lists the jobs")
    statuses = [ItemStatus.DONE, *(NOT_DONE if include_failed else ())]
    if output in (None, "-"):
        count = _write(db, job_id, statuses, sys.stdout)
        sys.stdout.flush()
    else:
        count = _write_atomically(db, job_id, statuses, Path(output))
    return Exported(job_id, count, job.item_count, job.status.value)


def _write_atomically(db: Database, job_id: int, statuses: list[ItemStatus], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            count = _write(db, job_id, statuses, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _write(db: Database, job_id: int, statuses: list[ItemStatus], out: TextIO) -> int:
    count = 0
    for row in queue.export_rows(db, job_id, statuses):
        out.write(json.dumps(export_record(row._mapping), ensure_ascii=False) + "\n")
        count += 1
    return count


def export_record(row: Any) -> dict[str, Any]:
    """Our own export format: one object per item."""
    record: dict[str, Any] = {
        "custom_id": row["custom_id"],
        "line": row["line"],
        "status": ItemStatus(row["status"]).value,
        "output": row["output"],
        "finish_reason": row["finish_reason"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "timings": None
        if row["total_ms"] is None
        else {
            "prompt_ms": _ms(row["prompt_ms"]),
            "generation_ms": _ms(row["generation_ms"]),
            "total_ms": _ms(row["total_ms"]),
        },
        "error": row["error"],
    }
    metadata = (row["request"] or {}).get("metadata")
    if metadata is not None:
        record["metadata"] = metadata
    return record


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)

"""Exporting results as JSON lines in input order, atomically (no half-written files)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from executor.errors import UsageError
from executor.jobs import openai_batch
from executor.machine import energy
from executor.paths import output_target, same_file
from executor.store import Database, queue, results
from executor.store.queue import Job
from executor.store.schema import ItemStatus

NOT_DONE = (ItemStatus.FAILED, ItemStatus.INVALID, ItemStatus.CANCELLED)
FORMATS = ("executor", "openai")  # ours (one object per item) and OpenAI's batch output


@dataclass(frozen=True)
class Exported:
    job_id: int
    lines: int
    item_count: int
    job_status: str
    failed: int = 0


def export_job(
    db: Database,
    job_id: int,
    output: str | None = None,
    *,
    include_failed: bool = False,
    fmt: str = "executor",
    errors: str | None = None,
    with_provenance: bool = False,
) -> Exported:
    """Write the job's items in input order to `output` (stdout by default).

    `fmt` "executor": one object per item, done ones (and failed, invalid and cancelled ones
    with `include_failed`). `fmt` "openai": OpenAI Batch API output lines; failed requests go
    to `errors` if given, else into the output among the others.
    """
    job = queue.require_job(db, job_id)
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if errors and fmt != "openai":
        raise UsageError(
            "--errors goes with --format openai (our own format keeps failed "
            "items in the output with --include-failed)"
        )
    if errors and same_file(output, errors):
        raise UsageError(f"-o and --errors name the same file ({errors}); give two files")
    for target, flag in ((output, "-o"), (errors, "--errors")):
        if (
            target not in (None, "-")
            and job.input_path != "-"
            and same_file(target, job.input_path)
        ):
            raise UsageError(
                f"{flag} {target} is job {job_id}'s input file: writing the results there "
                "would destroy its prompts",
                hint="give the results a file of their own",
            )
    with_failed = include_failed or fmt == "openai"
    statuses = [ItemStatus.DONE, *(NOT_DONE if with_failed else ())]
    job_energy = _job_energy(db, job) if with_provenance else None
    render = _Renderer(job_id, fmt, with_provenance, job_energy)
    with output_target(output) as out, output_target(errors, "--errors") as err:
        count = failed = 0
        for row in results.export_rows(db, job_id, statuses):
            line, is_error = render(row._mapping)
            (err if is_error and errors else out).write(_json_line(line))
            count += not is_error or not errors
            failed += is_error
    return Exported(job_id, count, job.item_count, job.status.value, failed)


def _job_energy(db: Database, job: Job) -> dict[str, Any]:
    """The job's energy so far: Wh, joules per generated token, and what measured it."""
    (state,) = results.progress(db, [job])
    return {
        **energy.describe(job.energy_mj, state.completion_tokens),
        "source": job.energy_source or "unknown",
    }


class _Renderer:
    """Turns an export row into the line of the chosen format."""

    def __init__(
        self, job_id: int, fmt: str, with_provenance: bool, job_energy: dict[str, Any] | None
    ) -> None:
        self.job_id = job_id
        self.fmt = fmt
        self.with_provenance = with_provenance
        self.job_energy = job_energy
        self.created = int(time.time())

    def __call__(self, row: Any) -> tuple[dict[str, Any], bool]:
        is_error = ItemStatus(row["status"]) != ItemStatus.DONE
        if self.fmt == "openai":
            line = (
                openai_batch.error_line(row, self.job_id)
                if is_error
                else openai_batch.response_line(row, self.job_id, self.created)
            )
        else:
            line = export_record(row)
        if self.with_provenance and not is_error:
            line["provenance"] = {**provenance(row), "job_energy": self.job_energy}
        return line, is_error


def _json_line(line: dict[str, Any]) -> str:
    """One JSON line, UTF-8 as written; a value that is not valid Unicode (a lone surrogate
    from an older database) is escaped rather than making the whole export fail."""
    text = json.dumps(line, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(line)
    return text + "\n"


def provenance(row: Any) -> dict[str, Any]:
    """What a result ran under: the model's hash, the parameters, the load and its plan."""
    return {
        "model_sha256": row["model_sha256"],
        "params": row["params"],
        "load": None
        if row["load_id"] is None
        else {
            "id": row["load_id"],
            "n_gpu_layers": row["n_gpu_layers"],
            "parallel": row["parallel"],
            "n_ctx": row["n_ctx"],
            "n_ubatch": row["n_ubatch"],
            "tensor_overrides": row["tensor_overrides"] or [],
            "gpu": row["gpu_name"],
            "vram_cap": row["vram_cap"],
            "predicted_vram": row["predicted_vram"],
            "measured_vram": row["measured_vram"],
        },
        "finished_at": row["created_at"].isoformat() + "Z" if row["created_at"] else None,
    }


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

"""Submitting a prompt file: validate every line, then enqueue a job in one transaction."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.config import Settings
from executor.errors import InputError, UsageError
from executor.gguf.models import resolve_model
from executor.jobs.fields import LineError, ModelResolver, bound_schema
from executor.jobs.fields import json_schema as checked_schema
from executor.jobs.inputs import PromptFile, format_problems
from executor.outcomes import FailCode
from executor.store import Database, queue
from executor.store.queue import NewItem
from executor.store.schema import ItemStatus
from executor.windows import Window

MAX_NAME = 200  # jobs.name holds 200 characters


@dataclass(frozen=True)
class Submitted:
    job_id: int
    created: bool  # False: the same submission existed already (idempotent resubmit)
    items: int
    invalid: int


def submit(
    settings: Settings,
    db: Database,
    source: str,
    *,
    name: str | None = None,
    force: bool = False,
    skip_invalid: bool = False,
    json_schema: dict[str, Any] | None = None,
    load: dict[str, Any] | None = None,
    min_vram: int | None = None,
    origin: str | None = None,
    display: str | None = None,
    refuse_requests: bool = False,
    priority: int = 0,
    window: str | None = None,
) -> Submitted:
    """Validate `source` (a path or '-') and enqueue it; nothing is written if any line is bad.

    The same content with the same model and parameters returns the existing job unless
    `force`, so cron can resubmit a file safely. `json_schema` constrains every line without
    its own; `load` holds settings for loading the job's model (ctx, parallel, vram_cap).
    `origin` (an API batch's id) is part of what makes a submission the same: the same file
    in two batches is two jobs, the same batch submitted twice is one. `display` names the
    file in messages; `refuse_requests` (OpenAI's batch semantics, for the server): a line
    whose request cannot be served is queued as an invalid item with its reason, while a
    line that is itself bad still refuses the whole file. `priority` (higher first) and
    `window` (the hours the job may run in) are not part of what makes a submission the same:
    resubmitting finds the job as it is (`executor priority` changes its priority).
    """
    if window is not None:
        try:
            window = Window.parse(window).text
        except ValueError as exc:
            raise UsageError(f"--window: {exc}") from None
    job_name = name or (None if source == "-" else Path(source).stem)
    if job_name is not None and (len(job_name) > MAX_NAME or not job_name.strip()):
        raise UsageError(
            f"job name {job_name[:40]!r}…: at most {MAX_NAME} characters, not blank"
            if job_name.strip()
            else "the job name is blank"
        )
    if json_schema is not None:
        try:
            json_schema = bound_schema(checked_schema(json_schema), settings.max_tokens)
        except LineError as exc:
            raise UsageError(f"--json-schema: {str(exc).removeprefix('json_schema')}") from None
    prompts = PromptFile(
        source,
        _model_resolver(settings),
        max_tokens=settings.max_tokens,
        max_line_bytes=settings.max_line_bytes,
        display=display,
        refuse_requests=refuse_requests,
    )
    try:
        scan = prompts.scan()
        if scan.invalid and not skip_invalid:
            raise InputError(
                f"{prompts.display}: {scan.invalid} invalid line"
                f"{'s' if scan.invalid != 1 else ''} of {scan.valid + scan.invalid}; "
                "nothing was queued (fix them, or pass --skip-invalid to queue the valid lines)",
                problems=format_problems(scan),
                total=scan.invalid,
            )
        if scan.valid == 0 and not scan.refused:
            raise InputError(
                f"{prompts.display}: no valid lines; nothing was queued",
                problems=format_problems(scan),
                total=scan.invalid,
            )
        if len(scan.models) > 1:
            named = ", ".join(f"{Path(m).name} (line {line})" for m, line in scan.models.items())
            raise InputError(
                f"{prompts.display}: the lines name {len(scan.models)} models "
                f"({named}); a job runs one model: split the file"
            )
        model = resolve_model(next(iter(scan.models), None) or settings.model, settings.models)
        params: dict[str, Any] = settings.generation_defaults()
        if json_schema is not None:
            params["json_schema"] = json_schema
        if load:
            params["load"] = load
        fingerprinted = {**params, "min_vram": min_vram} if min_vram else params  # a column
        fingerprint = _fingerprint(
            scan.sha256,
            str(model),
            {**fingerprinted, "origin": origin} if origin else fingerprinted,
        )
        # Finding an earlier job and creating this one are one transaction (under SQLite's
        # write lock or a PostgreSQL advisory lock on the fingerprint): twins queue one job.
        job, created = queue.create_job(
            db,
            name=job_name,
            model=str(model),
            params=params,
            input_path=prompts.path_for_record,
            input_sha256=scan.sha256,
            fingerprint=fingerprint,
            new_items=_new_items(prompts, scan.sha256),
            min_vram=min_vram,
            reuse=not force,
            priority=priority,
            window=window,
        )
        if not created:
            return Submitted(job.id, False, job.item_count, 0)
        rejected = scan.invalid + scan.refused
        return Submitted(job.id, True, scan.valid + rejected, rejected)
    finally:
        prompts.close()


def _new_items(prompts: PromptFile, expected_sha256: str) -> Iterator[NewItem]:
    """The second pass: every line as an item; raising here rolls the whole job back."""
    digest = hashlib.sha256()
    for entry in prompts.entries(digest):
        if entry.request is not None:
            yield NewItem(entry.line, entry.custom_id, entry.request)
        else:
            yield NewItem(
                entry.line,
                entry.custom_id,
                {"raw": entry.raw},
                status=ItemStatus.INVALID,
                error=entry.error,
                error_code=FailCode.INVALID_REQUEST,
            )
    if digest.hexdigest() != expected_sha256:
        raise InputError(f"{prompts.display} changed while it was being read; nothing was queued")


def _model_resolver(settings: Settings) -> ModelResolver:
    """How an OpenAI batch line's body.model becomes a GGUF path: through `models:` in the
    config, unless --model was given, which then serves every line."""
    override = settings.sources.get("model") == "flag"

    def model_for(name: str) -> str:
        if override:
            return str(resolve_model(settings.model, settings.models))
        if name in settings.models:
            return settings.models[name]
        raise LineError(
            f"unknown model {name!r}: map it to a GGUF file in the config file "
            f"(models: {{{name!r}: /path/to/model.gguf}}) or pass --model"
        )

    return model_for


def _fingerprint(input_sha256: str, model: str, params: dict[str, object]) -> str:
    canonical = json.dumps(
        {"input": input_sha256, "model": model, "params": params}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()

"""Sizing the context from the work: only an offline executor knows every prompt before it
loads the model. Each item's need is its prompt in the model's own tokens (chat template
included) plus its max_tokens; the job's context is the largest need of what is left, rounded
up to 256, at most the model's trained context."""

from __future__ import annotations

import logging
import time

from executor.engine.probes import ModelLoadFailed, PromptCounter
from executor.errors import ModelError
from executor.params import GenerationRequest
from executor.store import Database, context_needs
from executor.store.queue import Job

log = logging.getLogger(__name__)

DEFAULT_CTX = 4096  # without a job to size it from (and llama-server's default)
CONTEXT_STEP = 256  # llama.cpp pads the context to 256 cells


def context_for(need: int | None, n_ctx_train: int) -> int | None:
    """The context (tokens per sequence) for a need: rounded up to 256, at most the model's
    trained context (a longer need then ends at the context: finish_reason "length")."""
    if need is None:
        return None
    ctx = -(-need // CONTEXT_STEP) * CONTEXT_STEP
    if n_ctx_train:
        ctx = min(ctx, max(n_ctx_train, CONTEXT_STEP))
    return ctx


def job_context_need(db: Database, job: Job, engine: str) -> int | None:
    """The most tokens any unfinished item of `job` needs, counting the items not counted yet
    (once: the counts are stored) in a throwaway process that loads only the vocabulary.
    ModelError when that process cannot (the model will not load either)."""
    started = time.monotonic()
    counted = 0
    after = 0
    counter: PromptCounter | None = None
    try:
        while batch := context_needs.items_to_count(db, job.id, after_id=after):
            if counter is None:
                counter = PromptCounter(engine, job.model)
            requests = [
                GenerationRequest.build(i.id, i.custom_id, i.request, job.params) for i in batch
            ]
            counts = counter.count(requests)
            needs = {
                r.item_id: (n if n is not None else 0) + r.max_tokens
                for r, n in zip(requests, counts, strict=True)
            }
            context_needs.set_context_need(db, needs)
            counted += len(batch)
            after = batch[-1].id
    except ModelLoadFailed as exc:
        raise ModelError(f"{job.model}: cannot count the prompts' tokens ({exc})") from None
    finally:
        if counter is not None:
            counter.close()
    if counted:
        log.info(
            "job %s: counted the prompt tokens of %d items in %.1fs",
            job.id,
            counted,
            time.monotonic() - started,
            extra={"job": job.id},
        )
    return context_needs.context_need(db, job.id)

"""One claimed batch through the model process: feed it, checkpoint each result as it comes,
keep the slots full, and give back what was not done.

With `refill`, more of the job's items are claimed whenever fewer than `parallel` wait in
the model process, queued behind the ones in flight: the slots never drain between batches
(a batch's last steps would otherwise run with few sequences while items wait). When the
worker must wind down (a signal, its gate closing, the job's window closing, a job of
higher priority waiting) no more items are claimed; the ones in flight may finish within
`stop_timeout`, the rest go back to the queue.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from executor.engine.protocol import (
    BatchDone,
    FailCode,
    GenerationRequest,
    ItemDone,
    ItemFailed,
    ItemStarted,
    Progress,
)
from executor.errors import UnstorableResult
from executor.run.supervisor import Died, Tick
from executor.schemas import output_problem
from executor.store import queue
from executor.store.queue import ClaimedItem, Job
from executor.store.schema import JobStatus

if TYPE_CHECKING:
    from executor.run.worker import Worker

log = logging.getLogger(__name__)


class BatchRun:
    def __init__(self, worker: Worker, job: Job, refill: int) -> None:
        assert worker.loaded is not None
        self.w = worker
        self.loaded = worker.loaded
        self.job = job
        self.refill = refill
        self.params: dict[int, dict[str, Any]] = {}
        self.pending: set[int] = set()  # claimed, no outcome yet
        self.in_flight: set[int] = set()  # started in the model process
        self.live: dict[int, int] = {}  # tokens so far of each item in flight
        self.budgets: dict[int, int] = {}  # max_tokens of each claimed item

    def run(self, batch: list[ClaimedItem]) -> None:
        w, loaded = self.w, self.loaded
        heartbeat_every = w.settings.lease_seconds / 3
        last_heartbeat = time.monotonic()
        stop_deadline: float | None = None
        events = loaded.proc.run(self._requests_for(batch), stall_seconds=w.settings.stall_seconds)
        try:
            for event in events:
                if (
                    self.refill
                    and stop_deadline is None
                    and len(self.pending - self.in_flight) < loaded.parallel
                ):
                    self.refill = self._top_up(self.refill)
                halt = w.halt(self.job) if stop_deadline is None else None
                if isinstance(event, ItemStarted):
                    self.in_flight.add(event.item_id)
                elif isinstance(event, ItemDone):
                    self._done(event)
                elif isinstance(event, ItemFailed):
                    self._failed(event.item_id, event.reason, event.code)
                elif isinstance(event, Progress):
                    self.live = {i: n for i, n in event.tokens.items() if i in self.pending}
                    self._count_live()
                    w.events.tick(w.counts)
                    w.housekeeping()
                elif isinstance(event, Died):
                    self._model_died(event)
                    return
                elif isinstance(event, BatchDone):
                    break
                elif isinstance(event, Tick):
                    w.events.tick(w.counts)
                    w.housekeeping()
                if halt and stop_deadline is None:
                    # Items in flight may finish (at most stop_timeout); the rest go back.
                    stop_deadline = time.monotonic() + w.options.stop_timeout
                    self._release_unstarted(halt)
                if w.reached_max() and stop_deadline is None:
                    self._release_unstarted("--max-items reached")
                if stop_deadline is not None and (
                    w.signals > 1 or time.monotonic() > stop_deadline
                ):
                    log.warning("stopping now: releasing %d items in flight", len(self.in_flight))
                    w.kill()
                    self._release(self.in_flight)
                    return
                if time.monotonic() - last_heartbeat > heartbeat_every:
                    queue.renew_leases(
                        w.db, self.pending, owner=w.id, lease_seconds=w.settings.lease_seconds
                    )
                    last_heartbeat = time.monotonic()
            # Whatever the model process skipped (dropped items) goes back to the queue.
            self._release(set(self.pending))
        finally:
            self.live.clear()
            self._count_live()

    def _requests_for(self, claimed: list[ClaimedItem]) -> list[GenerationRequest]:
        built = [
            GenerationRequest.build(i.id, i.custom_id, i.request, self.job.params) for i in claimed
        ]
        self.params.update((r.item_id, r.params) for r in built)
        self.budgets.update((r.item_id, r.max_tokens) for r in built)
        self.pending.update(i.id for i in claimed)
        return built

    def _top_up(self, limit: int) -> int:
        """Claim more of the job's items and queue them in the model process; the refill
        limit for next time (0 once the job has nothing left to claim, or the worker
        winds down, or a job of higher priority waits)."""
        w = self.w
        if w.options.max_items is not None:
            limit = min(limit, w.options.max_items - w.finished() - len(self.pending))
        if limit <= 0 or w.halt(self.job) or w.outranked(self.job):
            return 0
        more = queue.claim(
            w.db, self.job.id, limit=limit, owner=w.id, lease_seconds=w.settings.lease_seconds
        )
        if not more:
            return 0
        if not self.loaded.proc.extend(self._requests_for(more)):
            return 0  # the process is gone: run() reports it, the items are released
        return limit

    def _done(self, event: ItemDone) -> None:
        w = self.w
        schema = self.params[event.item_id].get("json_schema")
        problem = output_problem(event.record.output, schema) if schema else None
        if problem:  # the grammar does not carry every keyword (schemas.py)
            self._failed(event.item_id, problem, FailCode.SCHEMA_NOT_MET)
            return
        try:
            recorded = queue.complete(
                w.db,
                event.item_id,
                owner=w.id,
                result=event.record,
                model_sha256=self.loaded.sha256,
                load_id=self.loaded.load_id,
                params=self.params[event.item_id],
            )
        except UnstorableResult as exc:
            self._failed(event.item_id, str(exc), FailCode.UNSTORABLE)
            return
        self._settled(event.item_id)
        if recorded:
            w.summary.done += 1
            w.summary.completion_tokens += event.record.completion_tokens
            w.item_finished(event.record.completion_tokens)
        else:
            self._drop_lost()

    def _failed(self, item_id: int, reason: str, code: FailCode = FailCode.FAILED) -> None:
        """This item alone failed (its prompt, its answer); the batch goes on."""
        w = self.w
        log.warning(
            "item %s failed: %s", item_id, reason, extra={"job": self.job.id, "item": item_id}
        )
        self._settled(item_id)
        if queue.fail_item(w.db, item_id, owner=w.id, error=reason, code=code):
            w.summary.failed += 1
            w.item_finished(0, failed=True)

    def _settled(self, item_id: int) -> None:
        self.pending.discard(item_id)
        self.in_flight.discard(item_id)
        self.budgets.pop(item_id, None)
        if self.live.pop(item_id, None) is not None:
            self._count_live()

    def _count_live(self) -> None:
        """The items in flight, in tokens and in fractions of items, for the job's pace."""
        counts = self.w.counts
        if counts is None:
            return
        counts.live_tokens = sum(self.live.values())
        counts.live_items = sum(
            min(n / max(self.budgets.get(i, 1), 1), 1.0) for i, n in self.live.items()
        )

    def _release_unstarted(self, why: str) -> None:
        unstarted = sorted(self.pending - self.in_flight)
        if unstarted:
            self.loaded.proc.drop(unstarted)
            self._release(set(unstarted))
            log.info("%s: released %d items not yet started", why, len(unstarted))

    def _release(self, ids: set[int]) -> None:
        if ids:
            queue.release(self.w.db, ids, owner=self.w.id)
            self.w.summary.released += len(ids)
            self.pending.difference_update(ids)

    def _drop_lost(self) -> None:
        """A result could not be recorded: the job was cancelled under us; skip the rest."""
        current = queue.get_job(self.w.db, self.job.id)
        if current is not None and current.status == JobStatus.CANCELLED:
            unstarted = self.pending - self.in_flight
            self.loaded.proc.drop(sorted(unstarted))
            self.pending.difference_update(unstarted)

    def _model_died(self, event: Died) -> None:
        """The model process crashed: count an attempt for the items it was working on."""
        w = self.w
        log.error("%s", event.reason, extra={"cause": "crash"})
        w.loader.crashed(self.loaded, event)
        w.loaded = None
        poisoned = queue.release(
            w.db,
            self.in_flight,
            owner=w.id,
            error=event.reason.splitlines()[0],
            count_attempt=True,
            max_attempts=w.settings.max_attempts,
        )
        for item_id in poisoned:
            log.error(
                "item %s crashed the model process %d times; failed",
                item_id,
                w.settings.max_attempts,
                extra={"item": item_id},
            )
            w.summary.failed += 1
            w.item_finished(0, failed=True)
        queue.release(w.db, self.pending - self.in_flight, owner=w.id)

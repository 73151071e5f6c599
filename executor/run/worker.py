"""The worker: claim a batch → generate in the model process → checkpoint each result.

Signal handlers only count signals; the loop looks at the count between events. One signal:
stop claiming, let the item in flight finish (up to the stop timeout), release the rest. Two:
stop now, releasing everything. The worker knows no screen: it reports its progress through
`RunEvents`, which the CLI renders (a bar on a terminal, log lines under cron).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor.config import Settings, xdg_dir
from executor.engine.protocol import BatchDone, ItemDone, ItemFailed, ItemStarted, Progress
from executor.errors import DatabaseGone, ModelError, UnstorableResult, WouldSwapError
from executor.machine import energy, gpu
from executor.outcomes import FailCode
from executor.params import GenerationRequest
from executor.planning.job_settings import job_load
from executor.planning.workload import context_for, job_context_need
from executor.run.events import JobCounts, NoEvents, RunEvents
from executor.run.loader import Loaded, ModelLoader
from executor.run.supervisor import Died, Tick
from executor.schemas import output_problem
from executor.store import Database, queue, results
from executor.store import workers as registry
from executor.store.locks import worker_lock
from executor.store.queue import ClaimedItem, Job
from executor.store.schema import JobStatus

log = logging.getLogger(__name__)

BEAT_SECONDS = 5.0  # registry heartbeats: what `workers` and the page show is this fresh


@dataclass(frozen=True)
class RunOptions:
    until_empty: bool = False
    job_id: int | None = None
    max_items: int | None = None
    stop_timeout: float = 30.0


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0  # items, those of jobs that failed as a whole included
    completion_tokens: int = 0
    released: int = 0
    stopped_by_signal: bool = False
    failed_jobs: dict[int, str] = field(default_factory=dict)  # job → why it failed whole


def engine_log_path(db: Database) -> Path:
    """Where the model process writes (llama.cpp's log included), one file per database."""
    tag = hashlib.sha256(str(db.url).encode()).hexdigest()[:10]
    return xdg_dir("state") / f"engine-{tag}.log"


class Worker:
    """Drains the queue with one model process, loading each model once."""

    def __init__(
        self, settings: Settings, db: Database, options: RunOptions, events: RunEvents
    ) -> None:
        self.settings = settings
        self.db = db
        self.options = options
        self.events = events
        self.card = gpu.pick(gpu.probe(), settings.gpu)
        self.host = socket.gethostname()
        # The worker's identity, and the owner of its leases: one worker per GPU per host.
        self.id = f"{self.host}:{self.card.uuid if self.card else 'cpu'}"
        self.signals = 0
        self.summary = RunSummary()
        self.loader = ModelLoader(
            settings, db, self.id, engine_log_path(db), stopping=lambda: self.stopping
        )
        self.loaded: Loaded | None = None
        self.job: Job | None = None
        self.counts: JobCounts | None = None
        self._beat_at = 0.0  # last registry heartbeat
        self._reclaimed_at = 0.0  # last return of others' expired leases
        self._live: dict[int, int] = {}  # tokens so far of each item in flight
        self._budgets: dict[int, int] = {}  # max_tokens of each claimed item
        self.meter = energy.meter(
            gpu.load_nvml() if self.card else None, self.card.uuid if self.card else None
        )

    # Signal handlers only count; everything else happens in the loop.
    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    @property
    def stopping(self) -> bool:
        return self.signals > 0

    def run(self) -> RunSummary:
        """Work until the queue is empty (--until-empty), --max-items, or a signal."""
        with worker_lock(self.db, self.id):
            # Holding the lock means no other worker runs as us: our old leases are stale
            # (and on SQLite, the only worker, every lease is).
            reclaimed = queue.reclaim_stale(self.db, everything=self.db.is_sqlite, owner=self.id)
            if reclaimed:
                log.info("returned %d items left running by a dead worker to the queue", reclaimed)
            registry.register(
                self.db,
                self.id,
                host=self.host,
                gpu_uuid=self.card.uuid if self.card else "cpu",
                gpu_name=self.card.name if self.card else None,
                vram_total=self.card.total if self.card else None,
                pid=os.getpid(),
            )
            try:
                self._loop()
            except DatabaseGone:
                self._kill()  # nothing more is written: the database is not ours any more
                raise
            finally:
                if not self.db.gone:
                    self._end_job()
                    self._unload()
                    registry.stopped(self.db, self.id)
            self.db.check_file()  # before reporting work a replaced file no longer holds
        self.summary.stopped_by_signal = self.stopping
        return self.summary

    def _loop(self) -> None:
        while not self.stopping and not self._reached_max():
            self._housekeeping()
            job = queue.next_job(
                self.db,
                job_id=self.options.job_id,
                prefer_model=self.loaded.model_path if self.loaded else None,
                vram=self.card.total if self.card else None,
            )
            self.job = job
            if job is None:
                # Other workers' leases may still come back (a dead worker's expire): drain
                # means nothing queued and nothing leased anywhere.
                if self.options.until_empty and not queue.running_items(
                    self.db, self.options.job_id
                ):
                    return
                self._end_job()
                # Draining: other workers' last items finish any moment; look again soon.
                self._sleep(
                    min(self.settings.poll_seconds, 1.0)
                    if self.options.until_empty
                    else self.settings.poll_seconds
                )
                continue
            if not self._ensure_model(job):
                continue
            assert self.loaded is not None
            # Enough items to keep every parallel slot busy through most of the batch.
            limit = self.settings.batch_size or max(16, 4 * self.loaded.parallel)
            if self.options.max_items is not None:
                limit = min(limit, self.options.max_items - self._finished())
            # Items that were in flight when the model process crashed run alone, so that
            # the next crash blames only the item that causes it, not its batch mates.
            batch = queue.claim(
                self.db,
                job.id,
                limit=1,
                owner=self.id,
                suspects=True,
                lease_seconds=self.settings.lease_seconds,
            )
            refill = 0 if batch else limit  # a suspect runs alone: nothing is added to it
            if not batch:
                batch = queue.claim(
                    self.db,
                    job.id,
                    limit=limit,
                    owner=self.id,
                    lease_seconds=self.settings.lease_seconds,
                )
            if batch:
                self._begin_job(job)
                before = self.meter.read() if self.meter else None
                try:
                    self._run_batch(job, batch, refill=refill)
                finally:
                    self._live.clear()
                    self._budgets.clear()
                    self._count_live()
                    if not self.db.gone:
                        self._add_energy(job, before)

    def _add_energy(self, job: Job, before: int | None) -> None:
        """What the device used during one batch goes to the job (a batch is one job's)."""
        after = self.meter.read() if self.meter else None
        if self.meter and before is not None and after is not None and after >= before:
            queue.add_energy(self.db, job.id, after - before, self.meter.source)

    def _run_batch(self, job: Job, batch: list[ClaimedItem], *, refill: int = 0) -> None:
        """Generate a claimed batch. With `refill`, claim up to that many more of the job's
        items whenever fewer than `parallel` wait in the model process, and queue them
        behind the ones in flight: the slots never drain between batches (a batch's last
        steps would otherwise run with few sequences, while items wait in the queue)."""
        assert self.loaded is not None
        loaded = self.loaded
        params: dict[int, dict[str, Any]] = {}
        pending: set[int] = set()  # claimed, no outcome yet
        in_flight: set[int] = set()  # started in the model process

        def requests_for(claimed: list[ClaimedItem]) -> list[GenerationRequest]:
            built = [
                GenerationRequest.build(i.id, i.custom_id, i.request, job.params) for i in claimed
            ]
            params.update((r.item_id, r.params) for r in built)
            self._budgets.update((r.item_id, r.max_tokens) for r in built)
            pending.update(i.id for i in claimed)
            return built

        heartbeat_every = self.settings.lease_seconds / 3
        last_heartbeat = time.monotonic()
        stop_deadline: float | None = None
        events = loaded.proc.run(requests_for(batch), stall_seconds=self.settings.stall_seconds)
        for event in events:
            if refill and stop_deadline is None and len(pending - in_flight) < loaded.parallel:
                refill = self._top_up(job, refill, pending, requests_for)
            if isinstance(event, ItemStarted):
                in_flight.add(event.item_id)
            elif isinstance(event, ItemDone):
                schema = params[event.item_id].get("json_schema")
                problem = output_problem(event.record.output, schema) if schema else None
                if problem:  # the grammar does not carry every keyword (schemas.py)
                    self._item_failed(
                        job, event.item_id, problem, pending, in_flight, FailCode.SCHEMA_NOT_MET
                    )
                    continue
                try:
                    recorded = queue.complete(
                        self.db,
                        event.item_id,
                        owner=self.id,
                        result=event.record,
                        model_sha256=loaded.sha256,
                        load_id=loaded.load_id,
                        params=params[event.item_id],
                    )
                except UnstorableResult as exc:
                    self._item_failed(
                        job, event.item_id, str(exc), pending, in_flight, FailCode.UNSTORABLE
                    )
                    continue
                self._settled(event.item_id, pending, in_flight)
                if recorded:
                    self.summary.done += 1
                    self.summary.completion_tokens += event.record.completion_tokens
                    self._item_finished(event.record.completion_tokens)
                else:
                    self._drop_lost(job, pending, in_flight)
            elif isinstance(event, ItemFailed):
                self._item_failed(job, event.item_id, event.reason, pending, in_flight, event.code)
            elif isinstance(event, Progress):
                self._live = {i: n for i, n in event.tokens.items() if i in pending}
                self._count_live()
                self.events.tick(self.counts)
                self._housekeeping()
            elif isinstance(event, Died):
                self._model_died(event, pending, in_flight)
                return
            elif isinstance(event, BatchDone):
                break
            elif isinstance(event, Tick):
                self.events.tick(self.counts)
                self._housekeeping()
            if self.stopping and stop_deadline is None:
                stop_deadline = time.monotonic() + self.options.stop_timeout
                self._release_unstarted(pending, in_flight, "stopping")
            if self._reached_max() and stop_deadline is None:
                self._release_unstarted(pending, in_flight, "--max-items reached")
            if stop_deadline is not None and (self.signals > 1 or time.monotonic() > stop_deadline):
                log.warning("stopping now: releasing %d items in flight", len(in_flight))
                self._kill()
                self._release(in_flight, pending)
                return
            if time.monotonic() - last_heartbeat > heartbeat_every:
                queue.renew_leases(
                    self.db, pending, owner=self.id, lease_seconds=self.settings.lease_seconds
                )
                last_heartbeat = time.monotonic()
        # Whatever the model process skipped (dropped items) goes back to the queue.
        self._release(pending, pending)

    def _top_up(
        self,
        job: Job,
        limit: int,
        pending: set[int],
        requests_for: Callable[[list[ClaimedItem]], list[GenerationRequest]],
    ) -> int:
        """Claim more of the job's items and queue them in the model process; the refill
        limit for next time (0 once the job has nothing left to claim)."""
        assert self.loaded is not None
        if self.options.max_items is not None:
            limit = min(limit, self.options.max_items - self._finished() - len(pending))
        if limit <= 0 or self.stopping:
            return 0
        more = queue.claim(
            self.db, job.id, limit=limit, owner=self.id, lease_seconds=self.settings.lease_seconds
        )
        if not more:
            return 0
        if not self.loaded.proc.extend(requests_for(more)):
            return 0  # the process is gone: run() reports it, the items are released
        return limit

    def _housekeeping(self, *, now: bool = False) -> None:
        """A heartbeat in the registry every few seconds (`now`: at once, e.g. when a model
        has loaded), with what the worker is doing: its model, job, tok/s, the tokens in
        flight; and every third of a lease, return expired leases of dead workers to the
        queue (on PostgreSQL, where several workers share it)."""
        clock = time.monotonic()
        if now or clock - self._beat_at >= min(BEAT_SECONDS, self.settings.lease_seconds / 3):
            self._beat_at = clock
            self.db.check_file()  # deleted or replaced under us: stop before writing more
            counts = self.counts
            registry.heartbeat(
                self.db,
                self.id,
                model=self.loaded.model_path if self.loaded else None,
                job_id=self.job.id if self.job else None,
                tokens_per_s=round(counts.tokens_per_s, 2) if counts else None,
                tokens_in_flight=counts.live_tokens if counts else None,
                items_in_flight=round(counts.live_items, 3) if counts else None,
                sample=(counts.job_id, counts.all_tokens) if counts and counts.all_tokens else None,
            )
        if not self.db.is_sqlite and clock - self._reclaimed_at >= self.settings.lease_seconds / 3:
            self._reclaimed_at = clock
            reclaimed = queue.reclaim_stale(self.db)
            if reclaimed:
                log.info("returned %d items with expired leases to the queue", reclaimed)

    def _count_live(self) -> None:
        """The items in flight, in tokens and in fractions of items, for the job's pace."""
        if self.counts is None:
            return
        self.counts.live_tokens = sum(self._live.values())
        self.counts.live_items = sum(
            min(n / max(self._budgets.get(i, 1), 1), 1.0) for i, n in self._live.items()
        )

    def _item_failed(
        self,
        job: Job,
        item_id: int,
        reason: str,
        pending: set[int],
        in_flight: set[int],
        code: FailCode = FailCode.FAILED,
    ) -> None:
        """This item alone failed (its prompt, its answer); the batch goes on."""
        log.warning("item %s failed: %s", item_id, reason, extra={"job": job.id, "item": item_id})
        self._settled(item_id, pending, in_flight)
        if queue.fail_item(self.db, item_id, owner=self.id, error=reason, code=code):
            self.summary.failed += 1
            self._item_finished(0, failed=True)

    def _settled(self, item_id: int, pending: set[int], in_flight: set[int]) -> None:
        pending.discard(item_id)
        in_flight.discard(item_id)
        self._budgets.pop(item_id, None)
        if self._live.pop(item_id, None) is not None:
            self._count_live()

    def _release_unstarted(self, pending: set[int], in_flight: set[int], why: str) -> None:
        unstarted = sorted(pending - in_flight)
        if unstarted:
            assert self.loaded is not None
            self.loaded.proc.drop(unstarted)
            self._release(set(unstarted), pending)
            log.info("%s: released %d items not yet started", why, len(unstarted))

    def _release(self, ids: set[int], pending: set[int]) -> None:
        if ids:
            queue.release(self.db, ids, owner=self.id)
            self.summary.released += len(ids)
            pending.difference_update(ids)

    def _drop_lost(self, job: Job, pending: set[int], in_flight: set[int]) -> None:
        """A result could not be recorded: the job was cancelled under us; skip the rest."""
        current = queue.get_job(self.db, job.id)
        if current is not None and current.status == JobStatus.CANCELLED:
            assert self.loaded is not None
            self.loaded.proc.drop(sorted(pending - in_flight))
            pending.difference_update(pending - in_flight)

    def _model_died(self, event: Died, pending: set[int], in_flight: set[int]) -> None:
        """The model process crashed: count an attempt for the items it was working on."""
        log.error("%s", event.reason, extra={"cause": "crash"})
        assert self.loaded is not None
        self.loader.crashed(self.loaded, event)
        self.loaded = None
        poisoned = queue.release(
            self.db,
            in_flight,
            owner=self.id,
            error=event.reason.splitlines()[0],
            count_attempt=True,
            max_attempts=self.settings.max_attempts,
        )
        for item_id in poisoned:
            log.error(
                "item %s crashed the model process %d times; failed",
                item_id,
                self.settings.max_attempts,
                extra={"item": item_id},
            )
            self.summary.failed += 1
            self._item_finished(0, failed=True)
        queue.release(self.db, pending - in_flight, owner=self.id)

    def _ensure_model(self, job: Job) -> bool:
        """Have the job's model loaded with a context its items fit in; if it cannot load at
        all, the job fails with why. A loaded model serves every job of its file and load
        settings: only a job that needs a longer context makes it reload."""
        try:
            if (
                self.loaded is not None
                and self.loaded.model_path == job.model
                and self.loaded.job_load == job_load(job)
                and self._context_fits(job)
            ):
                return True
            self._unload()
            self.loaded = self.loader.load(job.model, job)
            self._housekeeping(now=True)  # the registry shows the model from now on
        except WouldSwapError as exc:
            # This machine cannot hold the load as configured (its flags, its RAM): the
            # worker's problem, not the job's. Nothing is claimed; the items stay queued
            # for a worker that can, and this one stops (exit 8).
            raise WouldSwapError(
                f"job {job.id}'s model does not fit this worker: {exc}; its items stay queued",
                hint=exc.hint,
            ) from None
        except ModelError as exc:
            if self.stopping:
                return False
            reason = str(exc) + (f" ({exc.hint})" if exc.hint else "")
            log.error("job %s: %s", job.id, reason, extra={"job": job.id, "cause": "load"})
            self.summary.failed += queue.fail_job(self.db, job.id, reason)
            self.summary.failed_jobs[job.id] = reason
            return False
        return True

    def _context_fits(self, job: Job) -> bool:
        """Whether the loaded context holds this job's longest item (ctx auto)."""
        assert self.loaded is not None
        if self.loaded.settings.ctx != "auto":
            return True
        need = job_context_need(self.db, job, self.settings.engine)
        ctx = context_for(need, self.loaded.report.model.n_ctx_train)
        if ctx is not None and ctx > self.loaded.n_ctx:
            log.info(
                "job %s needs a context of %d (loaded: %d): reloading",
                job.id,
                ctx,
                self.loaded.n_ctx,
                extra={"job": job.id},
            )
            return False
        return True

    def _unload(self) -> None:
        """Stop the model process after its current item (normal end, or a model switch)."""
        if self.loaded is not None:
            self.loaded.proc.stop()
            self.loader.closed(self.loaded)
            self.loaded = None

    def _kill(self) -> None:
        """End the model process now (a second signal, or the stop timeout ran out)."""
        if self.loaded is not None:
            self.loaded.proc.kill()
            self.loader.closed(self.loaded)
            self.loaded = None

    def _begin_job(self, job: Job) -> None:
        if self.counts is not None and self.counts.job_id == job.id:
            return
        self._end_job()
        (state,) = results.progress(self.db, [job])
        label = f"job {job.id}" + (f" ({job.name})" if job.name else "")
        self.counts = JobCounts(job.id, label, job.item_count, state.finished)
        self.events.job_started(self.counts)
        self._housekeeping(now=True)

    def _item_finished(self, tokens: int, *, failed: bool = False) -> None:
        if self.counts is not None:
            self.counts.add(tokens, failed=failed)
            self.events.item_finished(self.counts)

    def _end_job(self) -> None:
        if self.counts is not None:
            self.events.job_ended(self.counts)
            self.counts = None

    def _finished(self) -> int:
        return self.summary.done + self.summary.failed

    def _reached_max(self) -> bool:
        return self.options.max_items is not None and self._finished() >= self.options.max_items

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.2, end - time.monotonic()))


def run_worker(
    settings: Settings, db: Database, options: RunOptions, events: RunEvents | None = None
) -> RunSummary:
    """Run a worker with SIGTERM/SIGINT handlers installed for its duration."""
    worker = Worker(settings, db, options, events or NoEvents())
    previous = {s: signal.signal(s, worker.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return worker.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

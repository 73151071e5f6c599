"""The store: migrations match the models; claims, leases, checkpoints and job states."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from executor.outcomes import ResultRecord
from executor.store import Database, open_database, queue, results, schedule
from executor.store.db import HEAD_REVISION, head_revision
from executor.store.queue import NewItem
from executor.store.schema import ItemStatus, JobStatus, items, metadata, utcnow

RESULT = ResultRecord(
    output="out", finish_reason="stop", prompt_tokens=3, completion_tokens=5, total_ms=12.5
)


def make_job(db: Database, n: int = 3, fingerprint: str = "f" * 64, **fields) -> int:
    """A job of `n` prompts; `fields` replace create_job's arguments (model, new_items, ...)."""
    values = dict(
        name="t",
        model="/m.gguf",
        params={"max_tokens": 8},
        input_path="/in.jsonl",
        input_sha256="0" * 64,
        fingerprint=fingerprint,
        new_items=(NewItem(i + 1, f"c{i + 1}", {"prompt": f"p{i + 1}"}) for i in range(n)),
    )
    job, _ = queue.create_job(db, **{**values, "reuse": False, **fields})
    return job.id


def test_blank_database_upgraded_to_head_matches_the_models(tmp_path: Path):
    db = open_database(f"sqlite:///{tmp_path / 'blank.db'}")
    assert db.revision() == head_revision() == HEAD_REVISION
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_sqlite_pragmas(db: Database):
    with db.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_write_transactions_begin_immediate(db: Database, db_path: Path):
    """While a write transaction is open, another connection cannot start writing."""
    other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    with db.write():
        try:
            other.execute("BEGIN IMMEDIATE")
            raise AssertionError("the write lock was not taken at BEGIN")
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")


def test_upgrade_twice_is_a_no_op(store: Database):
    store.upgrade()
    assert store.revision() == head_revision()


def test_claim_leases_in_input_order_and_starts_the_job(store: Database):
    job_id = make_job(store, 5)
    first = queue.claim(store, job_id, limit=2, owner="w1", lease_seconds=60)
    second = queue.claim(store, job_id, limit=10, owner="w1", lease_seconds=60)
    assert [i.line for i in first] == [1, 2]
    assert [i.line for i in second] == [3, 4, 5]
    assert queue.claim(store, job_id, limit=10, owner="w1", lease_seconds=60) == []
    job = queue.get_job(store, job_id)
    assert job.status == JobStatus.RUNNING and job.started_at is not None
    assert queue.running_items(store, owner="w1") == 5


def test_complete_checkpoints_once_and_finishes_the_job(store: Database):
    job_id = make_job(store, 2)
    a, b = queue.claim(store, job_id, limit=2, owner="w1", lease_seconds=60)
    assert queue.complete(store, a.id, owner="w1", result=RESULT, model_sha256="s" * 64)
    assert not queue.complete(store, a.id, owner="w1", result=RESULT, model_sha256="s" * 64)
    assert queue.get_job(store, job_id).status == JobStatus.RUNNING
    assert queue.fail_item(store, b.id, owner="w1", error="too long")
    job = queue.get_job(store, job_id)
    assert job.status == JobStatus.DONE and job.finished_at is not None
    (state,) = results.progress(store, [job])
    assert state.counts == {ItemStatus.DONE: 1, ItemStatus.FAILED: 1}
    assert (state.prompt_tokens, state.completion_tokens) == (3, 5)


def test_a_result_needs_the_lease(store: Database):
    job_id = make_job(store, 1)
    (item,) = queue.claim(store, job_id, limit=1, owner="w1", lease_seconds=60)
    assert not queue.complete(store, item.id, owner="someone-else", result=RESULT, model_sha256="s")


def test_release_counts_attempts_and_fails_poison_items(store: Database):
    job_id = make_job(store, 2)
    first, second = queue.claim(store, job_id, limit=2, owner="w", lease_seconds=60)
    assert queue.release(store, [first.id], owner="w", error="crash", count_attempt=True) == []
    queue.release(store, [second.id], owner="w")
    # A suspect (it was in flight at a crash) is claimed alone; others never with it.
    assert [i.id for i in queue.claim(store, job_id, limit=5, owner="w", lease_seconds=60)] == [
        second.id
    ]
    queue.release(store, [second.id], owner="w")
    for attempt in (2, 3):
        (suspect,) = queue.claim(store, job_id, limit=5, owner="w", lease_seconds=60, suspects=True)
        assert suspect.id == first.id and suspect.attempts == attempt - 1
        poisoned = queue.release(
            store, [first.id], owner="w", error="crash", count_attempt=True, max_attempts=3
        )
        assert poisoned == ([first.id] if attempt == 3 else [])
    assert queue.claim(store, job_id, limit=5, owner="w", lease_seconds=60, suspects=True) == []
    with store.read() as conn:
        rows = conn.execute(
            sa.select(items.c.line, items.c.status, items.c.attempts, items.c.error).order_by(
                items.c.line
            )
        ).all()
    assert rows[0][:3] == (1, ItemStatus.FAILED, 3)
    assert rows[0][3].startswith("crashed the worker 3 times")
    assert rows[1][:3] == (2, ItemStatus.QUEUED, 0)


def test_reclaim_own_identity_and_min_vram(store: Database):
    job_id = make_job(store, 2)
    queue.claim(store, job_id, limit=1, owner="host:GPU-1", lease_seconds=600)
    queue.claim(store, job_id, limit=1, owner="host:GPU-2", lease_seconds=600)
    assert queue.reclaim_stale(store, owner="host:GPU-1") == 1  # its own dead self's lease only
    assert queue.running_items(store) == 1
    big = make_job(
        store,
        model="/m",
        fingerprint="g" * 64,
        min_vram=40 * 2**30,
        new_items=[NewItem(1, "1", {"prompt": "x"})],
    )
    assert schedule.next_job(store, job_id=big, vram=24 * 2**30) is None
    assert schedule.next_job(store, job_id=big, vram=None) is None
    assert schedule.next_job(store, job_id=big, vram=80 * 2**30).id == big


def test_expired_leases_are_reclaimed(store: Database):
    job_id = make_job(store, 3)
    queue.claim(store, job_id, limit=3, owner="dead", lease_seconds=60)
    assert queue.reclaim_stale(store) == 0
    with store.write() as conn:
        conn.execute(sa.update(items).values(lease_until=utcnow() - timedelta(seconds=1)))
    assert queue.reclaim_stale(store) == 3
    assert len(queue.claim(store, job_id, limit=5, owner="w2", lease_seconds=60)) == 3


def test_renew_extends_only_own_leases(store: Database):
    job_id = make_job(store, 2)
    a, b = queue.claim(store, job_id, limit=2, owner="w1", lease_seconds=1)
    assert queue.renew_leases(store, [a.id, b.id], owner="w1", lease_seconds=600) == 2
    assert queue.renew_leases(store, [a.id], owner="w2", lease_seconds=600) == 0
    assert queue.reclaim_stale(store) == 0


def test_cancel_and_retry(store: Database):
    job_id = make_job(store, 3)
    (a,) = queue.claim(store, job_id, limit=1, owner="w", lease_seconds=60)
    assert queue.cancel_job(store, job_id) == 3
    assert not queue.complete(store, a.id, owner="w", result=RESULT, model_sha256="s")
    assert schedule.next_job(store) is None
    assert queue.retry_job(store, job_id) == 3
    assert queue.get_job(store, job_id).status == JobStatus.QUEUED
    assert schedule.next_job(store).id == job_id


def test_invalid_items_count_as_finished_and_are_never_retried(store: Database):
    job_id = make_job(
        store,
        model="/m",
        fingerprint="x" * 64,
        new_items=[NewItem(1, "1", {"raw": "nope"}, ItemStatus.INVALID, "not valid JSON")],
    )
    assert queue.get_job(store, job_id).status == JobStatus.DONE
    assert queue.retry_job(store, job_id) == 0


def test_next_job_prefers_the_loaded_model(store: Database):
    first = make_job(store, 1, fingerprint="a" * 64)
    second = make_job(
        store,
        model="/other.gguf",
        fingerprint="b" * 64,
        new_items=[NewItem(1, "1", {"prompt": "x"})],
    )
    assert schedule.next_job(store).id == first
    assert schedule.next_job(store, prefer_model="/other.gguf").id == second
    assert schedule.next_job(store, job_id=first, prefer_model="/other.gguf").id == first


def test_export_rows_in_input_order(store: Database):
    job_id = make_job(store, 3)
    claimed = queue.claim(store, job_id, limit=3, owner="w", lease_seconds=60)
    for item in reversed(claimed):
        queue.complete(store, item.id, owner="w", result=RESULT, model_sha256="s")
    rows = list(results.export_rows(store, job_id, [ItemStatus.DONE]))
    assert [r.custom_id for r in rows] == ["c1", "c2", "c3"]


def test_create_job_is_all_or_nothing(store: Database):
    def items_then_error():
        yield NewItem(1, "1", {"prompt": "a"})
        raise RuntimeError("file changed")

    with pytest.raises(RuntimeError):
        make_job(store, model="/m", fingerprint="z" * 64, new_items=items_then_error())
    assert queue.list_jobs(store) == []
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(items)).scalar() == 0

"""PostgreSQL: migrations, many workers on one queue, a worker killed midway, the registry."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from executor.store import notify, open_database
from executor.store.db import head_revision
from executor.store.schema import metadata
from tests.helpers import run_cli, start_cli, submit_rows, wait_for, write_jsonl


def test_blank_postgres_database_upgraded_to_head_matches_the_models(postgres):
    url = postgres.create(blank=True)
    try:
        db = open_database(url)
        assert db.revision() == head_revision()
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        db.dispose()
    finally:
        postgres.drop(url)


def fake_gpu(n: int) -> str:
    """A distinct fake GPU per worker: the worker identity is host + GPU."""
    return json.dumps([{"name": f"Fake GPU {n}", "uuid": f"GPU-fake-{n}", "total": 24 * 2**30}])


def counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT status, count(*) FROM items GROUP BY status").all()
        results = conn.exec_driver_sql(
            "SELECT count(*), count(DISTINCT item_id) FROM results"
        ).one()
    engine.dispose()
    return {**{status: n for status, n in rows}, "results": results[0], "distinct": results[1]}


def test_four_workers_drain_2000_items_exactly_once_despite_a_kill(tmp_path, pg_url, tiny_model):
    rows = [{"custom_id": f"c{i}", "prompt": f"item number {i}"} for i in range(2000)]
    job = str(submit_rows(tmp_path, None, tiny_model, rows, "--db", pg_url))
    env = {
        "EXECUTOR_ENGINE": "fake",
        "EXECUTOR_FAKE_TOKEN_SECONDS": "0.004",
        "EXECUTOR_LEASE_SECONDS": "10",
        "EXECUTOR_POLL_SECONDS": "0.5",
    }
    workers = [
        start_cli(
            "run",
            "--until-empty",
            "--db",
            pg_url,
            "--batch-size",
            "32",
            db_path=tmp_path / "unused.db",
            env={**env, "EXECUTOR_FAKE_NVML": fake_gpu(n)},
        )
        for n in range(4)
    ]
    wait_for(lambda: counts(pg_url).get("done", 0) >= 500, timeout=120, what="500 results")
    victim = workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    leased = counts(pg_url).get("running", 0)
    for worker in workers[:1] + workers[2:]:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    final = counts(pg_url)
    assert final == {"done": 2000, "results": 2000, "distinct": 2000}, final
    assert leased > 0  # the killed worker did hold leases, which the others took over
    status = json.loads(run_cli("status", job, "--json", "--db", pg_url, check=True).stdout)
    assert status["status"] == "done" and status["counts"]["done"] == 2000
    # Every live worker did part of the work.
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        per_worker = dict(
            conn.exec_driver_sql("SELECT worker_id, count(*) FROM results GROUP BY worker_id").all()
        )
    engine.dispose()
    assert len(per_worker) >= 3 and sum(per_worker.values()) == 2000


def test_one_worker_per_gpu_per_host(tmp_path, pg_url, tiny_model):
    rows = [{"prompt": f"slow {i} " + "word " * 50} for i in range(4)]
    str(submit_rows(tmp_path, None, tiny_model, rows, "--db", pg_url))
    env = {
        "EXECUTOR_ENGINE": "fake",
        "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05",
        "EXECUTOR_FAKE_NVML": fake_gpu(7),
    }
    first = start_cli("run", "--until-empty", "--db", pg_url, db_path=tmp_path / "x.db", env=env)
    wait_for(lambda: counts(pg_url).get("running", 0) > 0, what="the first worker's claim")
    same_gpu = run_cli("run", "--until-empty", "--db", pg_url, env=env)
    assert same_gpu.returncode == 3
    assert "already working as" in same_gpu.stderr and "GPU-fake-7" in same_gpu.stderr
    listing = json.loads(run_cli("workers", "--json", "--db", pg_url, check=True).stdout)
    (live,) = [w for w in listing if w["alive"]]
    assert live["gpu_uuid"] == "GPU-fake-7" and live["gpu_name"] == "Fake GPU 7"
    assert live["pid"] == first.pid
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    listing = json.loads(run_cli("workers", "--json", "--db", pg_url, check=True).stdout)
    assert not any(w["alive"] for w in listing)
    table = run_cli("workers", "--db", pg_url, check=True).stdout
    assert "GPU-fake-7" in table and "stopped" in table


def test_jobs_can_require_vram(tmp_path, pg_url, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    job = run_cli(
        "submit",
        str(path),
        "--model",
        str(tiny_model),
        "--min-vram",
        "40GiB",
        "--db",
        pg_url,
        check=True,
    ).stdout.strip()
    small = {"EXECUTOR_ENGINE": "fake", "EXECUTOR_FAKE_NVML": fake_gpu(1)}  # 24 GiB
    run_cli("run", "--until-empty", "--db", pg_url, env=small, check=True)
    assert counts(pg_url).get("queued") == 1  # not taken by the 24 GiB worker
    big = {
        "EXECUTOR_ENGINE": "fake",
        "EXECUTOR_FAKE_NVML": json.dumps(
            [{"name": "Fake H100", "uuid": "GPU-big", "total": 80 * 2**30}]
        ),
    }
    started = time.monotonic()
    run_cli("run", "--until-empty", "--job", job, "--db", pg_url, env=big, check=True)
    assert counts(pg_url).get("done") == 1 and time.monotonic() - started < 60


def test_an_idle_worker_wakes_on_new_work_not_at_its_next_poll(tmp_path, pg_url, tiny_model):
    """The worker polls every 600 s: an item done within a minute of its submit was claimed
    because the submit's NOTIFY woke it."""
    env = {"EXECUTOR_ENGINE": "fake", "EXECUTOR_POLL_SECONDS": "600", "EXECUTOR_DB": pg_url}
    worker = start_cli("run", db_path=Path("unused"), env=env)
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:

            def idle() -> bool:
                row = conn.exec_driver_sql("SELECT state FROM workers").first()
                conn.rollback()
                return row is not None and row[0] == "idle"

            wait_for(idle, what="the worker idle")
        submit_rows(tmp_path, None, tiny_model, [{"prompt": "wake up"}], "--db", pg_url)
        wait_for(lambda: counts(pg_url).get("done") == 1, timeout=60, what="the item done")
    finally:
        engine.dispose()
        worker.terminate()
        worker.communicate(timeout=60)


def test_announcements_while_busy_wake_a_waiter_once(pg_url):
    """Five announcements that came while the worker was busy: the next wait returns at once,
    and the one after waits (no five spurious claims); SQLite has nothing to listen to."""
    db = open_database(pg_url)
    waiter = notify.Waiter(db)
    try:
        assert waiter.wait(0.01) is False  # now listening
        for _ in range(5):
            with db.write() as conn:
                notify.announce(conn)
        assert waiter.wait(30) is True
        assert waiter.wait(0.5) is False
        stopped = waiter.wait(30, stop=lambda: True)  # a signal ends the wait at once
        assert stopped is False
    finally:
        waiter.close()
        db.dispose()


def _hold_hash(conn: sa.Connection) -> None:
    from executor.store.schema import model_files, utcnow
    from executor.store.upsert import upsert

    row = {"path": "/m.gguf", "size": 1, "mtime_ns": 1, "sha256": "a" * 64}
    upsert(conn, model_files, {**row, "hashed_at": utcnow()})


def _hold_pause(conn: sa.Connection) -> None:
    from executor.store.schema import pauses, utcnow
    from executor.store.upsert import insert_if_absent

    assert insert_if_absent(conn, pauses, {"target": "*", "paused_at": utcnow()})


def _hash_again(db) -> bool:
    from executor.store import model_hashes

    model_hashes.remember_sha256(db, "/m.gguf", 1, 1, "b" * 64)
    return model_hashes.cached_sha256(db, "/m.gguf", 1, 1) == "b" * 64


def _pause_again(db) -> bool:
    from executor.store import workers as registry

    return registry.pause(db, "*") is False and registry.paused(db, "w", "h") == "*"


@pytest.mark.parametrize(
    "hold, second", [(_hold_hash, _hash_again), (_hold_pause, _pause_again)], ids=["hash", "pause"]
)
def test_two_writers_of_one_key_at_once_do_not_collide(pg_url, hold, second):
    """Four workers hash the same model file at once; two shells pause at once. The first
    writer holds the key uncommitted while the second writes it (seen waiting on the lock
    before the first commits): the second replaces the row, or finds the pause there, where
    a delete + insert (or a look, then an insert) failed on the duplicate key."""
    db = open_database(pg_url, create=True)
    outcome: list[object] = []

    def write() -> None:
        try:
            outcome.append(second(db))
        except Exception as exc:  # asserted below: there must be none
            outcome.append(exc)

    def waiting() -> bool:
        query = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                 "AND datname = current_database()")  # fmt: skip
        with db.engine.connect() as conn:
            return bool(conn.exec_driver_sql(query).scalar())

    try:
        with db.engine.connect() as conn:
            tx = conn.begin()
            hold(conn)  # uncommitted: the key is locked
            writer = threading.Thread(target=write)
            writer.start()
            wait_for(waiting, timeout=30, what="the second writer waiting on the key")
            tx.commit()
            writer.join(timeout=30)
        assert outcome == [True]
    finally:
        db.dispose()

"""The GPU owner's night: a time window, pause and resume, stepping aside for another
process on the card, priorities, and the runtime known before a job starts."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from executor.config import load_settings
from executor.run.events import NoEvents
from executor.run.worker import RunOptions, Worker
from executor.store import open_database, schedule
from executor.store import workers as registry
from executor.windows import Window
from tests.helpers import (
    alive,
    count_items,
    model_pids,
    query,
    run_cli,
    run_cli_process,
    start_cli,
    submit_rows,
    wait_for,
    write_jsonl,
)

FAKE = {"EXECUTOR_ENGINE": "fake", "EXECUTOR_POLL_SECONDS": "0.2"}
BERLIN = ZoneInfo("Europe/Berlin")


# --- windows -----------------------------------------------------------------------------------


def at(text: str, zone=BERLIN) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=zone)


def test_a_window_across_midnight_and_several_ranges():
    w = Window.parse("22:00-07:00, 12:30-13:30", BERLIN)
    assert w.text == "22:00-07:00,12:30-13:30"
    assert w.is_open(at("2026-06-10 23:00")) and w.is_open(at("2026-06-11 06:59:59"))
    assert not w.is_open(at("2026-06-11 07:00")) and w.is_open(at("2026-06-11 13:00"))
    assert w.closes_at(at("2026-06-11 03:00")) == at("2026-06-11 07:00")
    assert w.opens_at(at("2026-06-11 08:00")) == at("2026-06-11 12:30")
    assert w.opens_at(at("2026-06-11 14:00")) == at("2026-06-11 22:00")
    # Ten hours of work from Wednesday 14:00: the night's 9 h, then the lunch hour.
    done, nights = w.open_time(at("2026-06-10 14:00"), 10 * 3600)
    assert nights == 2 and done == at("2026-06-11 13:30")
    nightly = Window.parse("22:00-07:00", BERLIN)
    done, nights = nightly.open_time(at("2026-06-10 14:00"), 20 * 3600)
    assert nights == 3 and done == at("2026-06-12 22:00") + timedelta(hours=2)


def test_a_window_is_its_wall_clock_hours_across_summer_time():
    w = Window.parse("22:00-07:00", BERLIN)
    spring = w.closes_at(at("2026-03-28 22:00")) - at("2026-03-28 22:00")
    autumn = w.closes_at(at("2026-10-24 22:00")) - at("2026-10-24 22:00")
    assert spring == timedelta(hours=8) and autumn == timedelta(hours=10)
    assert w.closes_at(at("2026-03-29 06:30")) == at("2026-03-29 07:00")


@pytest.mark.parametrize("bad", ["25:00-07:00", "22:00", "22:00-22:00", "nights", "7-8"])
def test_bad_windows_are_refused_with_the_flag(bad, db_path):
    done = run_cli("run", "--until-empty", "--window", bad, db_path=db_path)
    assert done.returncode == 2 and "--window" in done.stderr


def test_the_windows_zone_is_tz(monkeypatch):
    from executor.windows import local_zone

    monkeypatch.setenv("TZ", "America/New_York")
    assert str(local_zone()) == "America/New_York"


# --- a worker and its gate, in process with a clock the test moves ------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.moment = now

    def now(self) -> datetime:
        return self.moment


FAKE_SETTINGS = {"engine": "fake", "poll_seconds": 0.1, "parallel": 2, "window": "22:00-07:00"}


def test_outside_its_window_a_draining_worker_runs_nothing(tmp_path, db_path, tiny_model, caplog):
    caplog.set_level(logging.INFO)
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": "x"}] * 3)
    noon = Clock(datetime.now(UTC).replace(hour=12, minute=0))
    settings = load_settings({"db": str(db_path), **FAKE_SETTINGS, "window": "22:00-07:00"})
    worker = Worker(settings, open_database(settings.db_url), RunOptions(until_empty=True),
                    NoEvents(), clock=noon)  # fmt: skip
    worker.gate.window = Window.parse("22:00-07:00", UTC)
    summary = worker.run()
    assert summary.done == 0 and count_items(db_path, "queued") == 3
    assert "outside its window (22:00-07:00) until" in caplog.text and "3 items wait" in caplog.text
    night = Clock(noon.moment.replace(hour=23))
    worker = Worker(settings, open_database(settings.db_url), RunOptions(until_empty=True),
                    NoEvents(), clock=night)  # fmt: skip
    worker.gate.window = Window.parse("22:00-07:00", UTC)
    assert worker.run().done == 3


def test_a_window_closing_mid_run_unloads_and_the_work_resumes_when_it_opens(
    tmp_path, db_path, tiny_model, monkeypatch
):
    monkeypatch.setenv("EXECUTOR_FAKE_TOKEN_SECONDS", "0.05")
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": "w " * 10}] * 30)
    clock = Clock(datetime(2026, 6, 10, 23, 0, tzinfo=UTC))
    settings = load_settings({"db": str(db_path), **FAKE_SETTINGS})
    worker = Worker(settings, open_database(settings.db_url),
                    RunOptions(stop_timeout=1), NoEvents(), clock=clock)  # fmt: skip
    worker.gate.window = Window.parse("22:00-07:00", UTC)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: count_items(db_path, "done") >= 2, what="work inside the window")
        pid = worker.loaded.proc.pid
        clock.moment = datetime(2026, 6, 11, 7, 30, tzinfo=UTC)  # morning: the window closes
        wait_for(lambda: worker.loaded is None and not alive(pid), what="the model unloaded")
        db = open_database(f"sqlite:///{db_path}")
        (me,) = registry.listing(db, 60)
        assert me["state"].startswith("outside its window (22:00-07:00) until")
        assert me["resumes_at"] == datetime(2026, 6, 11, 22, 0)
        db.dispose()
        left = count_items(db_path, "queued")
        assert left > 0 and count_items(db_path, "running") == 0
        time.sleep(0.5)
        assert count_items(db_path, "queued") == left  # nothing runs outside the window
        clock.moment = datetime(2026, 6, 11, 22, 0, tzinfo=UTC)  # night again
        wait_for(lambda: count_items(db_path, "done") == 30, timeout=120, what="the rest")
    finally:
        worker.on_signal(15, None)
        thread.join(60)
    assert query(db_path, "SELECT count(*), count(DISTINCT item_id) FROM results") == [(30, 30)]


def test_a_real_worker_unloads_at_its_window_end_and_resumes_at_the_next(
    tmp_path, db_path, tiny_model
):
    """A worker process with a window of seconds: closing, it unloads (its model process is
    gone) and leaves the items queued; reopening, it finishes them, each once."""
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": "w " * 20}] * 40)
    now = datetime.now().astimezone()
    first_end = now + timedelta(seconds=8)
    second = (first_end + timedelta(seconds=6), first_end + timedelta(seconds=600))
    clock = "%H:%M:%S"
    window = (f"{(now - timedelta(seconds=1)).strftime(clock)}-{first_end.strftime(clock)},"
              f"{second[0].strftime(clock)}-{second[1].strftime(clock)}")  # fmt: skip
    env = {**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05", "EXECUTOR_PARALLEL": "2",
           "EXECUTOR_STOP_TIMEOUT": "1"}  # fmt: skip
    worker = start_cli("run", "--window", window, db_path=db_path, env=env)
    state_home = tmp_path / "xdg" / "state"
    try:

        def closed_and_unloaded():
            pids = model_pids(state_home)
            return pids and not any(alive(p) for p in pids) and count_items(db_path, "queued")

        wait_for(lambda: datetime.now().astimezone() > first_end, timeout=30)
        wait_for(closed_and_unloaded, timeout=15, what="the model unloaded after the window")
        assert datetime.now().astimezone() < second[0], "the machine was too slow to see it"
        state = query(db_path, "SELECT state FROM workers")[0][0]
        assert state.startswith(f"outside its window ({window}) until")
        wait_for(lambda: count_items(db_path, "done") == 40, timeout=180, what="the rest")
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert "unloading the model: outside its window" in err and "work resumes at" in err
    assert query(db_path, "SELECT count(*), count(DISTINCT item_id) FROM results") == [(40, 40)]
    assert len(model_pids(state_home)) >= 2  # loaded again after the window reopened


# --- pause and resume, across processes ------------------------------------------------------


def test_pause_from_another_shell_unloads_and_resume_goes_on(tmp_path, db_path, tiny_model):
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": "w " * 20}] * 40)
    env = {**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05", "EXECUTOR_PARALLEL": "2",
           "EXECUTOR_STOP_TIMEOUT": "1"}  # fmt: skip
    worker = start_cli("run", db_path=db_path, env=env)
    state_home = tmp_path / "xdg" / "state"
    try:
        wait_for(lambda: count_items(db_path, "done") >= 2, what="work")
        paused = run_cli_process("pause", db_path=db_path, check=True)
        assert "paused: every worker" in paused.stderr
        wait_for(lambda: not any(alive(p) for p in model_pids(state_home)), timeout=30,
                 what="the model unloaded")  # fmt: skip
        assert query(db_path, "SELECT state FROM workers")[0][0].startswith("paused")
        status = run_cli("status", db_path=db_path, check=True).stdout
        assert "paused (executor pause: every worker" in status
        left = count_items(db_path, "queued")
        assert left > 0 and count_items(db_path, "running") == 0
        # A draining worker started meanwhile runs nothing and says why.
        drain = run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE)
        assert drain.returncode in (0, 3)
        run_cli_process("resume", db_path=db_path, check=True)
        wait_for(lambda: count_items(db_path, "done") == 40, timeout=180, what="the rest")
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    assert query(db_path, "SELECT count(*), count(DISTINCT item_id) FROM results") == [(40, 40)]


def test_pause_of_one_worker_and_resume_of_nothing(db_path, tiny_model, tmp_path):
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": "x"}])
    assert (
        "paused: worker elsewhere"
        in run_cli("pause", "--worker", "elsewhere", db_path=db_path, check=True).stderr
    )
    done = run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE)
    assert done.returncode == 0 and count_items(db_path, "done") == 1  # not this host
    assert "1 pause lifted" in run_cli("resume", db_path=db_path, check=True).stderr
    assert "nothing was paused" in run_cli("resume", db_path=db_path, check=True).stderr


# --- stepping aside for another process on the card ---------------------------------------------


def test_yield_gpu_steps_aside_while_a_game_runs(tmp_path, db_path, tiny_model):
    card = tmp_path / "nvml.json"
    device = {"name": "Fake GPU", "uuid": "GPU-fake-0", "total": 24 * 2**30}
    card.write_text(json.dumps([device]))
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": "w " * 20}] * 40)
    env = {**FAKE, "EXECUTOR_FAKE_NVML": f"@{card}", "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05",
           "EXECUTOR_PARALLEL": "2", "EXECUTOR_STOP_TIMEOUT": "1",
           "EXECUTOR_YIELD_GPU_QUIET": "1"}  # fmt: skip
    worker = start_cli("run", "--yield-gpu", db_path=db_path, env=env)
    state_home = tmp_path / "xdg" / "state"
    try:
        wait_for(lambda: count_items(db_path, "done") >= 2, what="work")
        card.write_text(json.dumps([{**device, "graphics": {"4242": 3 * 2**30}}]))  # a game
        wait_for(lambda: not any(alive(p) for p in model_pids(state_home)), timeout=30,
                 what="the model unloaded")  # fmt: skip
        state = query(db_path, "SELECT state FROM workers")[0][0]
        assert state == "yielding the GPU to pid 4242 (3.00 GiB)"
        left = count_items(db_path, "queued")
        time.sleep(1.5)
        assert count_items(db_path, "queued") == left
        card.write_text(json.dumps([{**device, "graphics": {"4242": 100 * 2**20}}]))  # a desktop
        wait_for(lambda: count_items(db_path, "done") == 40, timeout=180, what="the rest")
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
    assert "yielding the GPU to pid 4242" in err and "working again" in err
    assert query(db_path, "SELECT count(*), count(DISTINCT item_id) FROM results") == [(40, 40)]


# --- priorities ---------------------------------------------------------------------------------


def make_job(db, model: str, *, priority: int = 0, age_s: float = 0, fingerprint: str) -> int:
    from executor.store import queue
    from executor.store.queue import NewItem
    from executor.store.schema import jobs, utcnow

    job, _ = queue.create_job(
        db, name=None, model=model, params={"max_tokens": 8}, input_path="/in",
        input_sha256="0" * 64, fingerprint=fingerprint, reuse=False, priority=priority,
        new_items=[NewItem(1, "a", {"prompt": "x"})],
    )  # fmt: skip
    if age_s:
        with db.write() as conn:
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job.id)
                .values(created_at=utcnow() - timedelta(seconds=age_s))
            )
    return job.id


def test_the_order_jobs_are_taken_in(store):
    old_other = make_job(store, "/b.gguf", age_s=3 * 3600, fingerprint="1" * 64)
    loaded = make_job(store, "/a.gguf", fingerprint="2" * 64)
    urgent = make_job(store, "/b.gguf", priority=5, fingerprint="3" * 64)
    young_other = make_job(store, "/b.gguf", fingerprint="4" * 64)
    assert schedule.next_job(store, prefer_model="/a.gguf").id == urgent  # priority first
    done = [urgent]
    # Among equals, the loaded model's job, but a job of another model that has waited past
    # max_model_wait takes its turn (oldest first).
    assert schedule.next_job(store, prefer_model="/a.gguf", exclude=done).id == old_other
    assert schedule.next_job(store, prefer_model="/a.gguf", exclude=done,
                             max_model_wait=4 * 3600).id == loaded  # fmt: skip
    assert schedule.next_job(store, prefer_model="/a.gguf",
                             exclude=[urgent, old_other]).id == loaded  # fmt: skip
    assert schedule.next_job(store, exclude=[urgent, old_other, loaded]).id == young_other
    job = schedule.set_priority(store, loaded, 9)
    assert job.priority == 9 and schedule.next_job(store).id == loaded
    assert schedule.outranked(store, schedule.next_job(store, exclude=[loaded]))


def test_priority_from_every_door(tmp_path, db_path, tiny_model):
    rows = [{"prompt": "x"}]
    job = submit_rows(tmp_path, db_path, tiny_model, rows, "--priority", "3")
    assert query(db_path, "SELECT priority FROM jobs WHERE id = ?", job) == [(3,)]
    done = run_cli("priority", str(job), "-2", db_path=db_path, check=True)
    assert f"job {job}: priority -2" in done.stderr
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "y"}])
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"input: in.jsonl\nmodel: {tiny_model}\npriority: 7\nwindow: 22:00-07:00\n")
    spec_job = run_cli("submit", str(spec), db_path=db_path, check=True).stdout.strip()
    assert query(db_path, "SELECT priority, window FROM jobs WHERE id = ?", spec_job) == [
        (7, "22:00-07:00")
    ]
    assert run_cli("priority", "99", "1", db_path=db_path).returncode == 5
    run_cli_process("run", "--until-empty", "--job", str(job), db_path=db_path, env=FAKE)
    finished = run_cli("priority", str(job), "1", db_path=db_path)
    assert finished.returncode == 2 and "no longer matters" in finished.stderr


def test_a_higher_priority_job_of_another_model_runs_after_the_current_batch(
    tmp_path, db_path, tiny_model
):
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_model.read_bytes())
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": "w " * 20}] * 60)
    env = {**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.02", "EXECUTOR_PARALLEL": "2",
           "EXECUTOR_BATCH_SIZE": "4"}  # fmt: skip
    worker = start_cli("run", "--until-empty", db_path=db_path, env=env)
    try:
        wait_for(lambda: count_items(db_path, "done") >= 3, what="the first job running")
        urgent = submit_rows(tmp_path, db_path, other, [{"prompt": "u"}] * 4, "--priority", "5")
        _, err = worker.communicate(timeout=240)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, err
    order = [j for (j,) in query(db_path, "SELECT i.job_id FROM results r JOIN items i "
                                          "ON i.id = r.item_id ORDER BY r.id")]  # fmt: skip
    first_urgent = order.index(urgent)
    assert order[first_urgent : first_urgent + 4] == [urgent] * 4  # all of it, at once
    assert 1 in order[first_urgent + 4 :]  # the first job finished afterwards
    assert "a job of higher priority than job 1 waits" in err
    assert query(db_path, "SELECT count(*), count(DISTINCT item_id) FROM results") == [(64, 64)]


# --- the runtime before it starts ---------------------------------------------------------------


def test_estimate_before_and_after_a_job_of_the_model_ran(tmp_path, db_path, tiny_model):
    rows = [{"prompt": "w " * 30, "max_tokens": 40} for _ in range(20)]
    first = submit_rows(tmp_path, db_path, tiny_model, rows)
    before = json.loads(run_cli("estimate", str(first), "--json", db_path=db_path,
                                env=FAKE, check=True).stdout)  # fmt: skip
    assert before["items"] == 20 and before["budget"] == 800 and before["seconds_expected"] is None
    run_cli_process("run", "--until-empty", db_path=db_path,
                    env={**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.01"}, check=True)  # fmt: skip
    second = submit_rows(tmp_path, db_path, tiny_model, [*rows, {"prompt": "x", "max_tokens": 40}])
    text = run_cli("estimate", str(second), db_path=db_path, env=FAKE, check=True).stdout
    assert f"job {second}: 21 items left" in text and "about" in text and "at most" in text
    assert "earlier job(s) of this model here" in text
    data = json.loads(run_cli("estimate", str(second), "--json", db_path=db_path,
                              env=FAKE, check=True).stdout)  # fmt: skip
    assert 0 < data["seconds_expected"] <= data["seconds_most"]
    assert 0 < data["expected_tokens"] <= data["budget"] == 840
    status = run_cli("status", db_path=db_path, env=FAKE, check=True).stdout
    assert "~" in status.splitlines()[1]  # the queued job's ETA is its estimate
    with_window = json.loads(run_cli("estimate", str(second), "--json", db_path=db_path,
                                     env={**FAKE, "EXECUTOR_WINDOW": "22:00-07:00"},
                                     check=True).stdout)  # fmt: skip
    assert with_window["window"] == "22:00-07:00" and with_window["nights"] >= 1

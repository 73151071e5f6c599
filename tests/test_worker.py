"""The worker loop through the real CLI and real processes, with the fake engine."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    ROOT,
    count_items,
    kill9,
    model_pids,
    query,
    read_jsonl,
    run_cli,
    start_cli,
    submit_rows,
    wait_for,
)

FAKE = {"EXECUTOR_ENGINE": "fake"}


def prompts(n: int, words: int = 3) -> list[dict]:
    return [{"custom_id": f"p{i}", "prompt": " ".join([f"w{i}"] * words)} for i in range(n)]


def test_submit_run_export_with_fake_engine(tmp_path, db_path, tiny_model):
    job = submit_rows(tmp_path, db_path, tiny_model, prompts(7))
    started = time.monotonic()
    run = run_cli("run", "--until-empty", "--batch-size", "3", db_path=db_path, env=FAKE)
    elapsed_ms = (time.monotonic() - started) * 1000
    assert run.returncode == 0, run.stderr
    assert "run finished: 7 done, 0 failed" in run.stderr
    out = tmp_path / "out.jsonl"
    run_cli("export", str(job), "-o", str(out), db_path=db_path, check=True)
    rows = read_jsonl(out)
    assert [r["custom_id"] for r in rows] == [f"p{i}" for i in range(7)]
    assert rows[0]["output"] == "echo: w0 w0 w0"
    assert rows[0]["status"] == "done" and rows[0]["finish_reason"] == "stop"
    assert rows[0]["completion_tokens"] == 4
    for row in rows:  # each item's time is a part of the run's, prompt + generation
        timings = row["timings"]
        assert 0 < timings["total_ms"] < elapsed_ms
        assert timings["prompt_ms"] + timings["generation_ms"] == pytest.approx(
            timings["total_ms"], abs=0.01
        )


def test_model_loads_once_for_all_batches(tmp_path, db_path, tiny_model):
    submit_rows(tmp_path, db_path, tiny_model, prompts(10))
    run_cli("run", "--until-empty", "--batch-size", "2", db_path=db_path, env=FAKE, check=True)
    assert len(model_pids(tmp_path / "xdg" / "state")) == 1


def test_max_items_and_job_filter(tmp_path, db_path, tiny_model):
    first = submit_rows(tmp_path, db_path, tiny_model, prompts(5))
    second = submit_rows(tmp_path, db_path, tiny_model, prompts(5, words=2))
    run = run_cli(
        "run",
        "--until-empty",
        "--job",
        str(second),
        "--max-items",
        "3",
        "--json",
        db_path=db_path,
        env=FAKE,
        check=True,
    )
    assert '"done": 3' in run.stdout
    assert query(
        db_path, "SELECT job_id, count(*) FROM items WHERE status='done' GROUP BY job_id"
    ) == [(second, 3)]
    assert count_items(db_path, "running") == 0  # nothing left leased
    run_cli("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    assert query(
        db_path,
        "SELECT job_id, count(*) FROM items WHERE status='done' GROUP BY job_id ORDER BY job_id",
    ) == [(first, 5), (second, 5)]


def test_generation_params_job_defaults_and_line_overrides(tmp_path, db_path, tiny_model):
    rows = [
        {"prompt": "a b c d e f"},
        {"prompt": "a b c d e f", "max_tokens": 2},
        {"prompt": "a b STOP c", "stop": ["STOP"]},
    ]
    job = submit_rows(tmp_path, db_path, tiny_model, rows, "--max-tokens", "4")
    run_cli("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    out = read_jsonl(run_cli("export", str(job), db_path=db_path, check=True).stdout)
    assert [(r["output"], r["finish_reason"]) for r in out] == [
        ("echo: a b c", "length"),
        ("echo: a", "length"),
        ("echo: a b ", "stop"),
    ]


def test_prompt_longer_than_context_fails_that_item_only(tmp_path, db_path, tiny_model):
    rows = [{"prompt": "short"}, {"prompt": " ".join(["long"] * 100)}, {"prompt": "fine"}]
    job = submit_rows(tmp_path, db_path, tiny_model, rows)
    run = run_cli("run", "--until-empty", "--ctx", "64", db_path=db_path, env=FAKE)
    assert run.returncode == 0
    out = read_jsonl(
        run_cli("export", str(job), "--include-failed", db_path=db_path, check=True).stdout
    )
    assert [r["status"] for r in out] == ["done", "failed", "done"]
    assert "prompt is 101 tokens; the context holds 64" in out[1]["error"]
    status = run_cli("status", str(job), "--json", db_path=db_path, check=True)
    assert '"status": "done"' in status.stdout


@pytest.mark.parametrize("parallel", [1, 4])
def test_child_killed_mid_batch_job_completes_exactly_once(tmp_path, db_path, tiny_model, parallel):
    job = submit_rows(tmp_path, db_path, tiny_model, prompts(12, words=4))
    state = tmp_path / "xdg" / "state"
    worker = start_cli(
        "run",
        "--until-empty",
        "--batch-size",
        "6",
        "--parallel",
        str(parallel),
        db_path=db_path,
        env={**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05"},
    )
    wait_for(lambda: count_items(db_path, "done") >= 2, what="two results")
    (first_child,) = model_pids(state)
    kill9(first_child)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert "was killed by SIGKILL while generating" in err
    assert len(model_pids(state)) == 2  # the worker started a new model process
    rows = read_jsonl(run_cli("export", str(job), db_path=db_path, check=True).stdout)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"p{i}" for i in range(12))
    assert all(r["status"] == "done" for r in rows)
    # The items in flight (one per parallel slot at most) got an attempt counted; no others.
    ((crashed,),) = query(db_path, "SELECT count(*) FROM items WHERE attempts = 1")
    assert crashed == 1 if parallel == 1 else 1 <= crashed <= parallel
    assert query(db_path, "SELECT count(*) FROM items WHERE attempts > 1") == [(0,)]
    assert query(db_path, "SELECT count(*) FROM results") == [(12,)]


def test_second_run_exits_with_lock_code_without_loading(tmp_path, db_path, tiny_model):
    submit_rows(tmp_path, db_path, tiny_model, prompts(6, words=5))
    state = tmp_path / "xdg" / "state"
    first = start_cli(
        "run",
        "--until-empty",
        "--parallel",
        "1",
        db_path=db_path,
        env={**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.1"},
    )
    wait_for(lambda: model_pids(state), what="the first model process")
    started = time.monotonic()
    second = run_cli("run", "--until-empty", db_path=db_path, env=FAKE)
    assert second.returncode == 3
    assert "another executor run is already working on this database" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert time.monotonic() - started < 30  # it did not wait for the first
    assert "Traceback" not in second.stderr
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert len(model_pids(state)) == 1


def test_lock_is_released_when_the_holder_is_killed(tmp_path, db_path, tiny_model):
    submit_rows(tmp_path, db_path, tiny_model, prompts(20, words=5))
    state = tmp_path / "xdg" / "state"
    first = start_cli(
        "run", "--until-empty", db_path=db_path, env={**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05"}
    )
    wait_for(lambda: count_items(db_path, "done") >= 1, what="a result")
    kill9(first.pid)
    first.wait()
    (child,) = model_pids(state)
    wait_for(lambda: not _alive_or_zombie(child), what="the orphaned model process to die")
    # The dead worker's leases are reclaimed at the next start; everything completes once.
    run_cli("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    assert count_items(db_path, "done") == 20
    assert query(db_path, "SELECT count(*) FROM results") == [(20,)]


def _alive_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_unloadable_model_fails_the_job_with_the_reason(tmp_path, db_path, tiny_model):
    job = submit_rows(tmp_path, db_path, tiny_model, prompts(2))
    os.truncate(tiny_model, 0)  # the file is damaged after submit
    run = run_cli("run", "--until-empty", db_path=db_path, env=FAKE)
    assert run.returncode == 6 and "job 1 failed as a whole" in run.stderr
    assert str(tiny_model) in run.stderr and "0 done, 2 failed" in run.stderr
    status = run_cli("status", str(job), "--json", db_path=db_path, check=True).stdout
    assert '"status": "failed"' in status and "is not a GGUF file" in status


def test_progress_is_plain_log_lines_without_a_terminal(tmp_path, db_path, tiny_model):
    submit_rows(tmp_path, db_path, tiny_model, prompts(4))
    run = run_cli(
        "run",
        "--until-empty",
        db_path=db_path,
        env={**FAKE, "EXECUTOR_PROGRESS_SECONDS": "0.1"},
        check=True,
    )
    lines = [line for line in run.stderr.splitlines() if "progress job" in line]
    assert lines and re.search(
        r"progress job 1: 4/4 items, 0 failed, [\d.]+ tok/s, ETA 0s$", lines[-1]
    )
    assert "\r" not in run.stderr


def test_json_log_lines(tmp_path, db_path, tiny_model):
    submit_rows(tmp_path, db_path, tiny_model, prompts(3))
    run = run_cli(
        "run", "--until-empty", "--log-format", "json", db_path=db_path, env=FAKE, check=True
    )
    records = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    progress = [r for r in records if r["logger"] == "executor.cli.progress"]
    assert progress[-1]["done"] == 3 and progress[-1]["total"] == 3
    assert {"ts", "level", "msg"} <= set(progress[-1])


def test_progress_bar_on_a_terminal(tmp_path, db_path, tiny_model):
    submit_rows(tmp_path, db_path, tiny_model, prompts(5))
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "executor", "run", "--until-empty"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=ROOT,
        env={
            **os.environ,
            **FAKE,
            "EXECUTOR_DB": str(db_path),
            "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05",
        },
    )
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=60)
    text = output.decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "job 1 (in-" in text and "█" in text and "5/5" in text
    assert "tok/s" in text and "ETA" in text and "\r" in text


def test_export_while_running_gives_what_is_done(tmp_path, db_path, tiny_model):
    job = submit_rows(tmp_path, db_path, tiny_model, prompts(10, words=6))
    worker = start_cli(
        "run",
        "--until-empty",
        "--parallel",
        "1",
        "--batch-size",
        "10",
        db_path=db_path,
        env={**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05"},
    )
    wait_for(lambda: count_items(db_path, "done") >= 2, what="two results")
    partial = read_jsonl(run_cli("export", str(job), db_path=db_path, check=True).stdout)
    assert 2 <= len(partial) < 10 and all(r["status"] == "done" for r in partial)
    worker.communicate(timeout=120)
    assert len(read_jsonl(run_cli("export", str(job), db_path=db_path, check=True).stdout)) == 10

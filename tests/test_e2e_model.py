"""End to end with the real default model through llama-cpp-python and the real CLI."""

from __future__ import annotations

import pytest

from tests.helpers import (
    ROOT,
    count_items,
    kill9,
    model_pids,
    query,
    read_jsonl,
    run_cli,
    run_cli_process,
    start_cli,
    wait_for,
    write_jsonl,
)

pytestmark = pytest.mark.model


def test_example_prompts_submit_run_export(tmp_path, db_path, default_model):
    """As a user types it: real `executor` processes, from the console script's entry point."""
    submitted = run_cli_process(
        "submit", str(ROOT / "examples" / "prompts.jsonl"), db_path=db_path, check=True
    )
    job = submitted.stdout.strip()
    assert "12 prompts queued" in submitted.stderr
    run = run_cli_process("run", "--until-empty", db_path=db_path, check=True)
    assert "run finished: 12 done, 0 failed" in run.stderr
    out = tmp_path / "results.jsonl"
    run_cli_process("export", job, "-o", str(out), db_path=db_path, check=True)
    rows = read_jsonl(out)
    expected = [r["custom_id"] for r in read_jsonl(ROOT / "examples" / "prompts.jsonl")]
    assert [r["custom_id"] for r in rows] == expected
    assert all(r["status"] == "done" and r["completion_tokens"] > 0 for r in rows)
    assert "2" in rows[0]["output"]  # "What is 1+1?"
    assert "Paris" in rows[1]["output"]
    assert query(db_path, "SELECT DISTINCT model_sha256 FROM results") == [
        ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",)
    ]
    status = run_cli("status", job, "--json", db_path=db_path, check=True).stdout
    assert '"status": "done"' in status and '"tokens_per_s": ' in status


def test_prompt_longer_than_the_context_fails_with_a_reason(tmp_path, db_path, default_model):
    rows = [
        {"custom_id": "ok", "prompt": "The sky is", "max_tokens": 4},
        {"custom_id": "long", "prompt": "word " * 400, "max_tokens": 4},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = run_cli("submit", str(path), db_path=db_path, check=True).stdout.strip()
    run_cli("run", "--until-empty", "--ctx", "128", db_path=db_path, check=True)
    out = read_jsonl(run_cli("export", job, "--include-failed", db_path=db_path, check=True).stdout)
    assert [r["status"] for r in out] == ["done", "failed"]
    assert out[1]["error"] == (
        "prompt is 401 tokens; the context holds 128 (raise --ctx or shorten the prompt)"
    )


def test_model_process_killed_mid_batch_every_item_once(tmp_path, db_path, default_model):
    rows = [
        {
            "custom_id": f"c{i}",
            "prompt": f"Write a long story about the number {i}.",
            "max_tokens": 48,
        }
        for i in range(8)
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = run_cli("submit", str(path), db_path=db_path, check=True).stdout.strip()
    state = tmp_path / "xdg" / "state"
    worker = start_cli("run", "--until-empty", db_path=db_path)
    wait_for(lambda: count_items(db_path, "done") >= 1, timeout=120, what="a first result")
    kill9(model_pids(state)[0])
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert "was killed by SIGKILL" in err
    out = read_jsonl(run_cli("export", job, db_path=db_path, check=True).stdout)
    assert sorted(r["custom_id"] for r in out) == sorted(r["custom_id"] for r in rows)
    assert all(r["status"] == "done" for r in out)
    assert query(db_path, "SELECT count(*) FROM results") == [(8,)]

"""The command line: messages, exit codes, stdin, idempotency, and the database left alone."""

from __future__ import annotations

import json

import pytest

from tests.helpers import query, read_jsonl, run_cli, table_counts, write_jsonl

BAD_LINES = [
    b"not json at all",
    b"[1, 2]",
    b'{"custom_id": "only-id"}',
    b'{"prompt": 12}',
    b'{"prompt": "x", "custom_id": "dup"}\n{"prompt": "y", "custom_id": "dup"}',
    b'{"prompt": "caf\xe9"}',
    b'{"messages": [{"role": "user"}]}',
    b'{"prompt": "x", "temperature": "hot"}',
]


@pytest.mark.parametrize("bad", BAD_LINES, ids=range(len(BAD_LINES)))
def test_bad_input_exit_2_names_file_and_line_and_writes_nothing(
    tmp_path, db_path, tiny_model, bad
):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "good"}\n' + bad + b"\n")
    run_cli("db", "upgrade", db_path=db_path, check=True)
    before = table_counts(db_path)
    result = run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path)
    assert result.returncode == 2
    assert f"{path}:2: " in result.stderr or f"{path}:3: " in result.stderr
    assert "nothing was queued" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert table_counts(db_path) == before


def test_empty_file_and_missing_file(tmp_path, db_path, tiny_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = run_cli("submit", str(empty), "--model", str(tiny_model), db_path=db_path)
    assert result.returncode == 2 and "empty file: no prompts to run" in result.stderr
    result = run_cli(
        "submit", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model), db_path=db_path
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_many_bad_lines_list_twenty_then_a_count(tmp_path, db_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_text("oops\n" * 30)
    result = run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path)
    assert result.returncode == 2
    assert result.stderr.count("not valid JSON") == 20
    assert "... and 10 more invalid lines" in result.stderr


def test_skip_invalid_queues_good_lines_and_records_bad_ones(tmp_path, db_path, tiny_model):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\nnope\n{"prompt": "b", "custom_id": "B"}\n')
    result = run_cli(
        "submit",
        str(path),
        "--model",
        str(tiny_model),
        "--skip-invalid",
        "--json",
        db_path=db_path,
        check=True,
    )
    data = json.loads(result.stdout)
    assert (data["items"], data["invalid"], data["created"]) == (3, 1, True)
    run_cli("run", "--until-empty", db_path=db_path, env={"EXECUTOR_ENGINE": "fake"}, check=True)
    rows = read_jsonl(
        run_cli(
            "export", str(data["job_id"]), "--include-failed", db_path=db_path, check=True
        ).stdout
    )
    assert [(r["custom_id"], r["status"]) for r in rows] == [
        ("1", "done"),
        ("2", "invalid"),
        ("B", "done"),
    ]
    assert rows[1]["error"].startswith("not valid JSON")
    done_only = read_jsonl(
        run_cli("export", str(data["job_id"]), db_path=db_path, check=True).stdout
    )
    assert [r["custom_id"] for r in done_only] == ["1", "B"]


def test_submit_from_stdin(db_path, tiny_model):
    lines = '{"prompt": "from stdin"}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    result = run_cli(
        "submit", "-", "--model", str(tiny_model), input=lines, db_path=db_path, check=True
    )
    assert result.stdout.strip() == "1"
    assert query(db_path, "SELECT input_path, name, item_count FROM jobs") == [("-", None, 2)]


def test_bad_stdin_names_stdin(db_path, tiny_model):
    result = run_cli("submit", "-", "--model", str(tiny_model), input=b"{bad\n", db_path=db_path)
    assert result.returncode == 2 and "<stdin>:1: not valid JSON" in result.stderr


def test_resubmit_is_idempotent_unless_forced_or_changed(tmp_path, db_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    args = ("submit", str(path), "--model", str(tiny_model))
    first = run_cli(*args, db_path=db_path, check=True)
    again = run_cli(*args, db_path=db_path, check=True)
    assert first.stdout == again.stdout == "1\n"
    assert "already has this file" in again.stderr
    assert run_cli(*args, "--temperature", "0.5", db_path=db_path, check=True).stdout == "2\n"
    assert run_cli(*args, "--force", db_path=db_path, check=True).stdout == "3\n"
    assert query(db_path, "SELECT count(*) FROM items") == [(6,)]


def test_export_writes_a_whole_file_or_none(tmp_path, db_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    out = tmp_path / "sub" / "out.jsonl"
    result = run_cli("export", "1", "-o", str(out), db_path=db_path, check=True)
    assert out.read_text() == ""  # nothing done yet: an empty, complete file
    assert "exported 0 of 1 items" in result.stderr and "(job is queued)" in result.stderr
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temporary left


def test_unknown_job_exit_5(db_path):
    run_cli("db", "upgrade", db_path=db_path, check=True)
    for args in (
        ("export", "42"),
        ("status", "42"),
        ("cancel", "42"),
        ("retry", "42"),
        ("run", "--job", "42"),
    ):
        result = run_cli(*args, db_path=db_path)
        assert result.returncode == 5, args
        assert "no job 42" in result.stderr and "Traceback" not in result.stderr


def test_cancel_then_retry(tmp_path, db_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    assert (
        "cancelled (2 items will not run"
        in run_cli("cancel", "1", db_path=db_path, check=True).stderr
    )
    run_cli("run", "--until-empty", db_path=db_path, env={"EXECUTOR_ENGINE": "fake"}, check=True)
    assert query(db_path, "SELECT status FROM jobs") == [("cancelled",)]
    assert "2 items queued again" in run_cli("retry", "1", db_path=db_path, check=True).stderr
    run_cli("run", "--until-empty", db_path=db_path, env={"EXECUTOR_ENGINE": "fake"}, check=True)
    assert query(db_path, "SELECT status FROM jobs") == [("done",)]


def test_missing_default_model_says_how_to_install(tmp_path, db_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    result = run_cli(
        "submit", str(path), db_path=db_path, env={"EXECUTOR_MODEL": str(tmp_path / "absent.gguf")}
    )
    assert result.returncode == 4 and "does not exist" in result.stderr


def test_not_a_gguf_model(tmp_path, db_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a model")
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    result = run_cli("submit", str(path), "--model", str(fake), db_path=db_path)
    assert result.returncode == 4 and "is not a GGUF file" in result.stderr


def test_bad_setting_is_a_usage_error(tmp_path, db_path):
    result = run_cli("run", "--until-empty", db_path=db_path, env={"EXECUTOR_CTX": "huge"})
    assert result.returncode == 2
    assert "EXECUTOR_CTX: expected an integer, got 'huge'" in result.stderr


def test_status_table_and_json(tmp_path, db_path, tiny_model):
    assert "no jobs yet" in run_cli("status", db_path=db_path, check=True).stdout
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    table = run_cli("status", db_path=db_path, check=True).stdout
    assert " ".join(table.splitlines()[0].split()) == (
        "JOB NAME STATUS QUEUED RUNNING DONE FAILED TOKENS TOK/S ETA ENERGY"
    )
    assert table.splitlines()[1].split()[:4] == ["1", "in", "queued", "2"]
    data = json.loads(run_cli("status", "--json", db_path=db_path, check=True).stdout)
    assert data[0]["counts"]["queued"] == 2 and data[0]["eta_s"] is None
    assert data[0]["energy_wh"] is None and data[0]["energy_source"] == "unknown"


def test_help_teaches(db_path):
    top = run_cli("--help", db_path=db_path, check=True).stdout
    for command in ("submit", "run", "status", "export", "cancel", "retry", "db"):
        assert command in top
    assert "custom_id" in run_cli("submit", "--help", db_path=db_path, check=True).stdout

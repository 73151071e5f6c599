"""Nothing a user can type breaks it: every wrong input, file, setting, database and URL ends
in one clear line, a documented exit code, and nothing lost, duplicated or half-written.

Each case of the table is (what is given, exit code, a fragment of the message); the database
is checked unchanged after every refused submission."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from executor.errors import InputError
from executor.jobs.inputs import PromptFile
from tests.helpers import (
    ROOT,
    query,
    read_jsonl,
    run_cli,
    run_cli_process,
    table_counts,
    write_jsonl,
)
from tests.synthetic_gguf import write_moe_gguf

FAKE = {"EXECUTOR_ENGINE": "fake", "EXECUTOR_BACKOFF_SECONDS": "0.01"}
GOOD = b'{"prompt": "fine"}\n'


def by_id(db_path: Path, job: str) -> dict[str, dict]:
    """The job's export with failed items, by custom_id."""
    lines = read_jsonl(run_cli("export", job, "--include-failed", db_path=db_path).stdout)
    return {r["custom_id"]: r for r in lines}


# --- input lines ---------------------------------------------------------------------------------

BAD_LINES = [
    (
        "deep",
        b'{"prompt": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "nested 100001 levels deep",
    ),
    ("long number", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
    ("duplicate key", b'{"prompt": "x", "prompt": "y"}', "duplicate key 'prompt'"),
    ("NaN", b'{"prompt": "x", "temperature": NaN}', "NaN is not valid JSON"),
    ("Infinity", b'{"prompt": "x", "top_p": -Infinity}', "-Infinity is not valid JSON"),
    ("float seed", b'{"prompt": "x", "seed": 1.5}', "seed must be an integer"),
    (
        "surrogate in metadata",
        b'{"prompt": "x", "metadata": {"k": "\\ud800"}}',
        "a lone UTF-16 surrogate (\\ud800) in metadata.k",
    ),
    ("surrogate in a prompt", b'{"prompt": "emoji \\ud83d cut"}', "lone UTF-16 surrogate"),
    ("NUL in a prompt", b'{"prompt": "a\\u0000b"}', "a NUL character (\\u0000) in prompt"),
    (
        "NUL in messages",
        b'{"messages": [{"role": "user", "content": "\\u0000"}]}',
        "in messages[0].content",
    ),
    (
        "huge minLength",
        b'{"prompt": "x", "json_schema": {"type": "string", "minLength": 100000000}}',
        "json_schema.minLength = 100000000 cannot be met in 256 tokens",
    ),
]


@pytest.mark.parametrize(
    ("line", "message"), [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_bad_lines_are_line_errors(tmp_path, db_path, tiny_model, line, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD + line + b"\n")
    run_cli("db", "upgrade", db_path=db_path, check=True)
    before = table_counts(db_path)
    started = time.monotonic()
    result = run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path)
    assert result.returncode == 2, result.stderr
    assert f"{path}:2: " in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert table_counts(db_path) == before
    assert time.monotonic() - started < 60  # bounded work, whatever the line


def test_a_byte_order_mark_is_accepted(tmp_path, db_path, tiny_model):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b'{"prompt": "two"}\r\n')
    result = run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    assert "2 prompts queued" in result.stderr


def test_a_huge_line_is_refused_before_it_is_read_whole(tmp_path, db_path, tiny_model):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(GOOD)
        f.write(b'{"prompt": "' + b"word " * 2_000_000 + b'"}\n')  # 10 MB
        f.write(GOOD)
    result = run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path)
    assert result.returncode == 2
    assert f"{path}:2: the line is 10,000,015 bytes; at most 4,194,304" in result.stderr
    env = {"EXECUTOR_MAX_LINE_BYTES": "1024"}
    args = ("submit", str(path), "--model", str(tiny_model), "--skip-invalid")
    smaller = run_cli(*args, db_path=db_path, env=env, check=True)
    assert "3 prompts queued (1 invalid" in smaller.stderr


def test_a_huge_max_length_is_dropped_not_spelled_out(tmp_path, db_path, tiny_model):
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**9}}}
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x", "json_schema": schema}])
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    ((request,),) = query(db_path, "SELECT request FROM items")
    assert json.loads(request)["json_schema"]["properties"]["a"] == {"type": "string"}


# --- files given where files belong --------------------------------------------------------------


def test_input_files_that_are_not_regular_files(tmp_path, db_path, tiny_model):
    args = ("--model", str(tiny_model))
    folder = run_cli("submit", str(tmp_path), *args, db_path=db_path)
    assert folder.returncode == 2 and "is a directory, not a file" in folder.stderr
    mem = run_cli("submit", "/proc/self/mem", *args, db_path=db_path)
    assert mem.returncode == 2 and "cannot be read (Input/output error)" in mem.stderr
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(GOOD * 3)

    writer = threading.Thread(target=feed)
    writer.start()
    piped = run_cli("submit", str(fifo), *args, db_path=db_path)
    writer.join()
    assert piped.returncode == 0 and "3 prompts queued" in piped.stderr  # spooled, read twice


def test_settings_files_that_are_wrong(tmp_path, db_path, tiny_model):
    (tmp_path / "conf.d").mkdir()
    folder = run_cli("config", "show", "--config", str(tmp_path / "conf.d"), db_path=db_path)
    assert folder.returncode == 2 and "is a directory" in folder.stderr
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"ctx: 1024 # caf\xe9\n")
    bad = run_cli("config", "show", "--config", str(latin), db_path=db_path)
    assert bad.returncode == 2 and "is not UTF-8 text (byte 0xe9" in bad.stderr
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    schema_dir = run_cli(
        "submit",
        str(prompts),
        "--model",
        str(tiny_model),
        "--json-schema",
        str(tmp_path),
        db_path=db_path,
    )
    assert schema_dir.returncode == 2 and "is a directory" in schema_dir.stderr


def test_a_yaml_bomb_is_refused_at_once(tmp_path, db_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    spec = tmp_path / "bomb.yaml"
    spec.write_text("\n".join(lines) + "\ninput: x.jsonl\n")
    started = time.monotonic()
    result = run_cli("submit", str(spec), db_path=db_path)
    assert result.returncode == 2 and "aliases" in result.stderr and "YAML bomb" in result.stderr
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("how", "env", "args"),
    [
        ("flag", {}, ("--temperature", "nan")),
        ("env", {"EXECUTOR_TEMPERATURE": "inf"}, ()),
        ("env seed", {"EXECUTOR_SEED": "1.5"}, ()),
    ],
)
def test_non_numbers_are_refused_everywhere(tmp_path, db_path, tiny_model, how, env, args):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = run_cli(
        "submit", str(prompts), "--model", str(tiny_model), *args, db_path=db_path, env=env
    )
    assert result.returncode == 2, result.stderr
    assert "finite number" in result.stderr or "expected an integer" in result.stderr
    assert table_counts(db_path) == (0, 0, 0)


def test_non_numbers_in_config_and_specs(tmp_path, db_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("temperature: .nan\n")
    result = run_cli("config", "show", "--config", str(conf), db_path=db_path)
    assert result.returncode == 2 and "nan is not a number a setting can hold" in result.stderr
    spec = tmp_path / "s.yaml"
    spec.write_text("input: in.jsonl\ntop_p: .inf\n")
    result = run_cli("submit", str(spec), db_path=db_path)
    assert result.returncode == 2 and "inf is not a number" in result.stderr


def test_a_truncated_model_is_named(tmp_path, db_path, tiny_model):
    cut = tmp_path / "cut.gguf"
    data = tiny_model.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = run_cli("submit", str(prompts), "--model", str(cut), db_path=db_path)
    assert result.returncode == 4
    assert f"{cut} is truncated or corrupt: its tensor table needs" in result.stderr
    assert f"the file has {len(data) // 2:,}" in result.stderr
    model = run_cli("model", str(cut), db_path=db_path)
    assert model.returncode == 4 and "truncated" in model.stderr


# --- outputs -------------------------------------------------------------------------------------


@pytest.fixture
def done_job(tmp_path, db_path, tiny_model) -> str:
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a b"}, {"prompt": "c d"}])
    job = run_cli(
        "submit", str(prompts), "--model", str(tiny_model), db_path=db_path, check=True
    ).stdout.strip()
    run_cli("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    return job


def test_export_to_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path, db_path, done_job):
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    run_cli("export", done_job, "-o", str(link), db_path=db_path, check=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert [r["output"] for r in read_jsonl(target)] == ["echo: a b", "echo: c d"]


def test_export_to_devices_and_fifos_streams(tmp_path, db_path, done_job):
    run_cli_process("export", done_job, "-o", "/dev/null", db_path=db_path, check=True)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))  # noqa: SIM115
    reader.start()
    run_cli("export", done_job, "-o", str(fifo), db_path=db_path, check=True)
    reader.join(10)
    assert len(read_jsonl(got[0].decode())) == 2 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    full = run_cli_process("export", done_job, "-o", "/dev/full", db_path=db_path)
    assert full.returncode == 10 and "no space left on the device" in full.stderr


def test_export_refuses_directories_bad_places_and_one_file_twice(tmp_path, db_path, done_job):
    folder = run_cli("export", done_job, "-o", str(tmp_path), db_path=db_path)
    assert folder.returncode == 2 and "is a directory; name a file inside it" in folder.stderr
    (tmp_path / "plain").write_text("x")
    under = run_cli("export", done_job, "-o", str(tmp_path / "plain" / "o.jsonl"), db_path=db_path)
    assert under.returncode == 2 and "cannot write in" in under.stderr
    same = run_cli(
        "export",
        done_job,
        "--format",
        "openai",
        "-o",
        str(tmp_path / "o.jsonl"),
        "--errors",
        str(tmp_path / "." / "o.jsonl"),
        db_path=db_path,
    )
    assert same.returncode == 2 and "name the same file" in same.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_a_spec_whose_output_is_a_directory_is_refused_before_running(tmp_path, db_path):
    (tmp_path / "out").mkdir()
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": "in.jsonl", "output": "out"}))
    result = run_cli("run-job", str(spec), db_path=db_path, env=FAKE)
    assert (
        result.returncode == 2 and "output" in result.stderr and "is a directory" in result.stderr
    )
    assert table_counts(db_path) == (0, 0, 0)


# --- what cannot be stored -----------------------------------------------------------------------


def test_an_answer_that_cannot_be_stored_fails_that_item_only(tmp_path, store, tiny_model):
    url = str(store.url.render_as_string(hide_password=False))
    rows = [{"custom_id": f"c{i}", "prompt": f"p{i} {'BAD' if i == 1 else ''}"} for i in range(3)]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    job = run_cli(
        "submit", str(prompts), "--model", str(tiny_model), "--db", url, check=True
    ).stdout.strip()
    env = {**FAKE, "EXECUTOR_FAULT_BAD_OUTPUT_ON": "BAD"}
    run = run_cli("run", "--until-empty", "--db", url, env=env)
    assert run.returncode == 0, run.stderr
    out = read_jsonl(run_cli("export", job, "--include-failed", "--db", url, check=True).stdout)
    assert [r["status"] for r in out] == ["done", "failed", "done"]
    assert "cannot be stored" in out[1]["error"]


# --- databases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("db", "code", "message"),
    [
        ("mysql://u@h/x", 2, "unsupported database"),
        ("http://example.com/db", 2, "unsupported database"),
        ("garbage://", 2, "unsupported database"),
        ("sqlite://", 2, "in-memory SQLite database"),
        ("sqlite:///:memory:", 2, "in-memory SQLite database"),
        ("postgresql+psycopg://u:hunter2@127.0.0.1:9/x", 7, "cannot reach"),
    ],
)
def test_database_urls(tmp_path, tiny_model, db, code, message):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    for args in (("submit", str(prompts), "--model", str(tiny_model)), ("db", "revision")):
        result = run_cli(*args, "--db", db)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and "hunter2" not in result.stderr
        assert "SELECT" not in result.stderr and "Traceback" not in result.stderr


def test_damaged_read_only_and_newer_databases(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    submit = ("submit", str(prompts), "--model", str(tiny_model))
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(8192))
    result = run_cli(*submit, "--db", str(junk))
    assert result.returncode == 7 and "is not a SQLite database, or it is damaged" in result.stderr
    good = tmp_path / "good.db"
    run_cli(*submit, "--db", str(good), check=True)
    read_only = f"sqlite:///file:{good}?mode=ro&uri=true"
    result = run_cli(*submit, "--force", "--db", read_only)
    assert result.returncode == 7 and "read-only" in result.stderr
    conn = sqlite3.connect(good)
    conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.commit()
    conn.close()
    for args in (submit, ("status",), ("export", "1")):
        result = run_cli(*args, "--db", str(good))
        assert result.returncode == 7, args
        assert "schema revision 9999, which this executor does not know" in result.stderr


def test_reading_commands_never_create_a_database(tmp_path):
    missing = tmp_path / "typo" / "executor.db"
    for args in (("status",), ("workers",), ("export", "1"), ("cancel", "1"), ("db", "revision")):
        result = run_cli(*args, "--db", str(missing))
        assert result.returncode in (0, 7), (args, result.stderr)
        assert "no database at" in result.stderr
    assert not (tmp_path / "typo").exists()


def test_a_long_job_name_is_refused_on_both_backends(tmp_path, store, tiny_model):
    url = str(store.url.render_as_string(hide_password=False))
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = run_cli(
        "submit", str(prompts), "--model", str(tiny_model), "--name", "n" * 300, "--db", url
    )
    assert result.returncode == 2 and "at most 200 characters" in result.stderr


def test_an_unwritable_state_folder_leaves_items_queued(tmp_path, db_path, tiny_model):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    run_cli("submit", str(prompts), "--model", str(tiny_model), db_path=db_path, check=True)
    (tmp_path / "file").write_text("not a folder")
    env = {**FAKE, "XDG_STATE_HOME": str(tmp_path / "file" / "state")}
    result = run_cli("run", "--until-empty", db_path=db_path, env=env)
    assert result.returncode == 10 and "cannot write the model process's log" in result.stderr
    assert query(db_path, "SELECT status, count(*) FROM items GROUP BY status") == [("queued", 2)]


# --- concurrency ---------------------------------------------------------------------------------


def test_eight_identical_submits_at_once_queue_one_job(tmp_path, store, tiny_model):
    url = str(store.url.render_as_string(hide_password=False))
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(200)])
    run_cli("db", "upgrade", "--db", url, check=True)
    env = {**os.environ, "EXECUTOR_DB": url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "executor", "submit", str(prompts), "--model", str(tiny_model)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [e for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # all eight print the same job id
    status = json.loads(run_cli("status", "--json", "--db", url, check=True).stdout)
    assert len(status) == 1 and status[0]["items"] == 200


# --- secrets and permissions ---------------------------------------------------------------------


def test_files_are_private_whatever_the_umask(tmp_path, tiny_model):
    home = tmp_path / "data"
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    env = {**FAKE, "XDG_DATA_HOME": str(home), "XDG_STATE_HOME": str(tmp_path / "state")}
    script = "import os, sys; os.umask(0o022); from executor.cli import main; main(sys.argv[1:])"
    for args in (("submit", str(prompts), "--model", str(tiny_model)), ("run", "--until-empty")):
        subprocess.run(
            [sys.executable, "-c", script, *args],
            env={**os.environ, **env},
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    folder = home / "executor"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = [p for p in folder.iterdir()]
    assert {p.name for p in files} >= {"executor.db", "executor.db.lock"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    logs = list((tmp_path / "state" / "executor").iterdir())
    assert logs and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in logs)


def test_no_command_prints_a_password(tmp_path, tiny_model, pg_url):
    from sqlalchemy import make_url

    url = make_url(pg_url)
    host = url.query.get("host")
    secret = f"postgresql+psycopg://postgres:TOPSECRET1@/{url.database}?host={host}&port=5439"
    query_secret = f"{pg_url}&password=TOPSECRET2"
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    commands = [
        ("config", "show"),
        ("config", "show", "--json"),
        ("status",),
        ("status", "--json"),
        ("workers",),
        ("db", "revision"),
        ("db", "upgrade"),
        ("doctor",),
        ("submit", str(prompts), "--model", str(tiny_model)),
        ("export", "1"),
        ("cancel", "1"),
    ]
    for db in (secret, query_secret, "postgresql+psycopg://u:TOPSECRET3@127.0.0.1:9/x"):
        for args in commands:
            result = run_cli(*args, env={"EXECUTOR_DB": db, **FAKE})
            output = result.stdout + result.stderr
            assert "TOPSECRET" not in output, (args, output)


# --- found while reading the code ----------------------------------------------------------------


def test_submit_and_run_job_of_one_spec_are_one_job(tmp_path, db_path, tiny_model):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump({"input": "in.jsonl", "model": str(tiny_model), "min_vram": "1GiB"})
    )
    run_cli("submit", str(spec), db_path=db_path, check=True)
    run_cli("run-job", str(spec), db_path=db_path, env=FAKE)  # no GPU of 1 GiB here: not run
    assert query(db_path, "SELECT count(*), min(min_vram) FROM jobs") == [(1, 2**30)]


def test_plan_and_model_know_the_aliases(tmp_path, db_path, tiny_model):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"models": {"tiny": str(tiny_model)}}))
    plan = run_cli("plan", "tiny", "--config", str(conf), "--no-dry-run", db_path=db_path)
    assert plan.returncode == 0 and "tiny.gguf" in plan.stdout
    model = run_cli("model", "tiny", "--config", str(conf), "--json", db_path=db_path, check=True)
    assert json.loads(model.stdout)["path"] == str(tiny_model)
    data = json.loads(
        run_cli(
            "plan",
            "tiny",
            "--config",
            str(conf),
            "--json",
            "--no-dry-run",
            db_path=db_path,
            check=True,
        ).stdout
    )
    assert len(data["model"]["sha256"]) == 64


def test_help_tells_the_real_defaults(db_path):
    text = run_cli("run", "--help", db_path=db_path, check=True).stdout
    assert "default auto" in text.replace("\n", " ")


def test_an_oom_after_halving_parallel_is_remembered_under_the_config_that_loaded(
    tmp_path, db_path
):
    from tests.synthetic_gguf import write_llama_gguf

    model = write_llama_gguf(tmp_path / "m.gguf", "1b")
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"w{i} " * 4} for i in range(4)])
    run_cli("submit", str(prompts), "--model", str(model), db_path=db_path, check=True)
    card = json.dumps([{"name": "Big", "uuid": "GPU-big", "total": 80 * 2**30}])
    env = {
        **FAKE,
        "EXECUTOR_FAKE_NVML": card,
        "EXECUTOR_PARALLEL": "4",
        "EXECUTOR_SHRINK_PARALLEL_FIRST": "1",
        "EXECUTOR_FAULT_OOM_LOAD_ABOVE": "29",
        "EXECUTOR_FAULT_OOM_DECODE_ABOVE": "26",
    }
    run_cli("run", "--until-empty", db_path=db_path, env=env, check=True)
    loads = query(db_path, "SELECT parallel, n_gpu_layers, outcome FROM loads ORDER BY id")
    assert loads[:3] == [(4, 30, "oom"), (2, 30, "oom"), (1, 30, "oom")]
    # The decode OOM at 27 layers happened at parallel 1: remembered under parallel 1 (not the
    # parallel 4 first asked for); the reload that then ran at parallel 4 is remembered as is.
    remembered = query(db_path, "SELECT parallel, n_gpu_layers FROM known_configs")
    assert sorted(remembered) == [(1, 24), (4, 24)], remembered


# --- hangs, loops -------------------------------------------------------------------------------


def test_a_hung_model_process_is_killed_and_its_item_retried(tmp_path, db_path, tiny_model):
    rows = [{"custom_id": f"c{i}", "prompt": f"w{i} {'HANG' if i == 2 else ''}"} for i in range(4)]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    job = run_cli(
        "submit", str(prompts), "--model", str(tiny_model), db_path=db_path, check=True
    ).stdout.strip()
    env = {
        **FAKE,
        "EXECUTOR_FAULT_HANG_ON": "HANG",
        "EXECUTOR_STALL_SECONDS": "2",
        "EXECUTOR_PARALLEL": "1",
    }
    run = run_cli("run", "--until-empty", db_path=db_path, env=env)
    assert run.returncode == 0, run.stderr
    out = by_id(db_path, job)
    assert out["c2"]["status"] == "failed"
    assert (
        "crashed the worker 3 times; last: model process made no progress for 2s"
        in out["c2"]["error"]
    )
    assert all(out[f"c{i}"]["status"] == "done" for i in (0, 1, 3))


@pytest.mark.model
def test_a_chat_template_that_never_ends_fails_its_item(tmp_path, db_path):
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    model = write_moe_gguf(tmp_path / "loop.gguf", "tiny-qwen3moe", chat_template=template)
    rows = [
        {"custom_id": "chat", "messages": [{"role": "user", "content": "hi"}]},
        {"custom_id": "raw", "prompt": "plain text", "max_tokens": 4},
    ]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    job = run_cli(
        "submit", str(prompts), "--model", str(model), db_path=db_path, check=True
    ).stdout.strip()
    run_cli("run", "--until-empty", db_path=db_path, check=True)
    out = by_id(db_path, job)
    assert out["chat"]["status"] == "failed"
    assert "the chat template did not finish in 10s" in out["chat"]["error"]
    assert out["raw"]["status"] == "done"


# --- the validator, by property ------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
LINE_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(),
        "messages": JSON_VALUES,
        "custom_id": JSON_VALUES,
        "max_tokens": JSON_VALUES,
        "temperature": JSON_VALUES,
        "seed": JSON_VALUES,
        "stop": JSON_VALUES,
        "metadata": JSON_VALUES,
        "json_schema": JSON_VALUES,
        "body": JSON_VALUES,
        "url": st.sampled_from(["/v1/chat/completions", "/v1/completions", "x"]),
    },
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(
        st.one_of(
            LINE_OBJECTS.map(lambda obj: json.dumps(obj).encode()),
            st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_any_lines_are_either_queued_or_named(tmp_path, lines):
    """Random JSON lines and random bytes: never an internal error; every line is valid or
    has a reason, and every valid line would be queued."""
    path = tmp_path / "random.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        prompts = PromptFile(str(path), lambda name: "/m.gguf")
        entries = list(prompts.entries())
    except InputError:
        return
    for entry in entries:
        assert (entry.request is None) != (entry.error is None)
        if entry.request is not None:
            json.dumps(entry.request, ensure_ascii=False).encode("utf-8")  # storable


# --- round three -------------------------------------------------------------------------------


def test_a_job_id_too_large_for_any_database_is_no_such_job(tmp_path, db_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    huge = "99999999999999999999999"
    for args in (("export", huge), ("status", huge), ("cancel", huge), ("retry", huge),
                 ("run", "--job", huge), ("plan", "--job", huge)):  # fmt: skip
        done = run_cli(*args, db_path=db_path)
        assert done.returncode == 5 and f"no job {huge}" in done.stderr, (args, done.stderr)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "-inf"])
def test_stop_timeout_must_be_a_finite_number_of_seconds(db_path, value):
    done = run_cli("run", "--until-empty", "--stop-timeout", value, db_path=db_path)
    assert done.returncode == 2 and "--stop-timeout" in done.stderr
    env = run_cli("run", "--until-empty", db_path=db_path, env={"EXECUTOR_STOP_TIMEOUT": value})
    assert env.returncode == 2 and "EXECUTOR_STOP_TIMEOUT" in env.stderr


def test_a_bad_ubatch_names_the_flag_the_user_typed(db_path):
    done = run_cli("run", "--until-empty", "--ubatch", "0", db_path=db_path)
    assert done.returncode == 2 and "--ubatch: must be at least 32" in done.stderr
    assert "--n-ubatch" not in done.stderr


def test_a_yaml_key_given_twice_is_refused_with_its_line(tmp_path, db_path, tiny_model):
    config = tmp_path / "config.yaml"
    config.write_text("ctx: 512\nparallel: 2\nctx: 1024\n")
    done = run_cli("config", "show", "--config", str(config))
    assert done.returncode == 2
    assert f"{config}:3: key 'ctx' is given twice (first on line 1)" in done.stderr
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    spec = tmp_path / "job.yaml"
    spec.write_text(f"input: in.jsonl\nmodel: {tiny_model}\nnested:\n  a: 1\n  a: 2\n")
    done = run_cli("submit", str(spec), db_path=db_path)
    assert done.returncode == 2 and "key 'a' is given twice" in done.stderr


@pytest.mark.parametrize("value", [":memory:", "file:q.db?mode=memory", "file:q.db"])
def test_in_memory_and_uri_sqlite_databases_are_refused(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    done = run_cli_process("submit", str(path), env={"EXECUTOR_DB": value})
    assert done.returncode == 2, done.stderr
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "xdg"]


def test_a_job_name_cannot_drive_the_terminal(tmp_path, db_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    name = "nightly\x1b[2J\x1b]0;owned\x07\rfake"
    run_cli("submit", str(path), "--model", str(tiny_model), "--name", name, db_path=db_path,
            check=True)  # fmt: skip
    table = run_cli("status", db_path=db_path, check=True).stdout
    assert "\x1b" not in table and "\x07" not in table and "\r" not in table
    assert "nightly\\x1b[2J" in table
    ran = run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE)
    assert "\x1b" not in ran.stderr and "\r" not in ran.stderr


def test_results_never_overwrite_the_job_input(tmp_path, db_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    before = path.read_bytes()
    spec = tmp_path / "job.yaml"
    spec.write_text(f"input: in.jsonl\nmodel: {tiny_model}\noutput: ./in.jsonl\n")
    done = run_cli("run-job", str(spec), db_path=db_path, env=FAKE)
    assert done.returncode == 2 and "is the job's input file" in done.stderr
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    for target in (str(path), str(link)):
        done = run_cli("export", "1", "-o", target, db_path=db_path)
        assert done.returncode == 2 and "is job 1's input file" in done.stderr
    assert path.read_bytes() == before


def test_folders_made_for_results_are_private_whatever_the_umask(tmp_path, db_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    out = tmp_path / "a" / "b" / "out.jsonl"
    old = os.umask(0)
    try:
        run_cli("export", "1", "-o", str(out), db_path=db_path, check=True)
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_bytes_of_another_encoding_are_refused_by_name(tmp_path, db_path):
    """A Latin-1 file name or variable reaches Python as lone surrogates, which cannot be
    stored or printed: each is exit 2 naming the argument, flag or variable, not an
    internal error."""
    latin1 = os.fsdecode(b"caf\xe9")  # what the shell passes for a Latin-1 name
    prompts = tmp_path / f"{latin1}.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    for args, env, named in (
        (("submit", str(prompts)), {}, "FILE"),
        (("submit", "-", "--name", latin1), {}, "--name"),
        (("export", "1", "-o", str(tmp_path / f"{latin1}.out")), {}, "--output"),
        (("status",), {"EXECUTOR_MODEL": latin1}, "EXECUTOR_MODEL"),
        (("status",), {"EXECUTOR_DB": str(tmp_path / f"{latin1}.db")}, "EXECUTOR_DB"),
    ):
        env = {"EXECUTOR_DB": str(db_path), **env}
        done = run_cli_process(*args, env=env, input='{"prompt": "x"}\n')
        assert done.returncode == 2, (args, done.stderr)
        assert f"{named}: not valid UTF-8" in done.stderr and "internal" not in done.stderr
    assert not db_path.exists()  # nothing was queued

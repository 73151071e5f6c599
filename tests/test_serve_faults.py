"""`executor serve` as OpenAI's Batch API behaves when a request, a file, a disk, a client or
a second server misbehaves: each ends with the batch in a state OpenAI's client understands
and nothing written twice."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

import httpx
import openai
import pytest

from executor.config import load_settings
from executor.serve import batches as service
from executor.serve.files import FileStore
from executor.store import api, open_database
from tests.helpers import query, run_cli, run_cli_process, start_cli, wait_for
from tests.serving import KEY, Server, chat_line, stored_batch, upload
from tests.serving import wait_for as wait_for_batch

FAKE = {"EXECUTOR_ENGINE": "fake"}


def create(client, file_id: str):
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def test_a_request_the_model_cannot_serve_is_answered_alone(tmp_path, db_path, server):
    """Five good requests and four it cannot serve: the batch completes, the four are in the
    error file with a 400 each, request_counts.failed counts them."""
    client = server.client()
    long_prompt = " ".join(["word"] * 9000)  # over SmolLM2's 8192-token trained context
    lines = [chat_line(i) for i in range(5)] + [
        chat_line(5, n=3),
        chat_line(6, model="gpt-4o"),
        chat_line(7, temperature=9),
        json.dumps({"custom_id": "r8", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "smollm2", "max_tokens": 4,
                             "messages": [{"role": "user", "content": long_prompt}]}}),
    ]  # fmt: skip
    b = create(client, upload(client, tmp_path, lines).id)
    assert b.status == "in_progress" and b.request_counts.total == 9
    run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    done, _ = wait_for_batch(client, b.id, {"completed", "failed"}, timeout=60)
    assert done.status == "completed", done.errors
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 4)
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in out] == [f"r{i}" for i in range(5)]
    errors = {
        x["custom_id"]: x
        for x in map(json.loads, client.files.content(done.error_file_id).text.splitlines())
    }
    assert sorted(errors) == ["r5", "r6", "r7", "r8"]
    for line in errors.values():
        assert line["error"] is None and line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
    codes = {k: v["response"]["body"]["error"]["code"] for k, v in errors.items()}
    assert codes == {"r5": "invalid_request", "r6": "invalid_request", "r7": "invalid_request",
                     "r8": "context_length_exceeded"}  # fmt: skip
    messages = {k: v["response"]["body"]["error"]["message"] for k, v in errors.items()}
    assert "n = 3" in messages["r5"] and "gpt-4o" in messages["r6"]
    assert "temperature" in messages["r7"] and "context holds" in messages["r8"]


def test_a_file_of_only_refused_requests_completes_with_every_one_in_the_error_file(
    tmp_path, db_path, server
):
    client = server.client()
    b = create(client, upload(client, tmp_path, [chat_line(0, n=2), chat_line(1, n=2)]).id)
    done, _ = wait_for_batch(client, b.id, {"completed", "failed"}, timeout=60)
    assert done.status == "completed" and done.request_counts.failed == 2, done.errors
    assert client.files.content(done.output_file_id).text == ""
    assert len(client.files.content(done.error_file_id).text.splitlines()) == 2


def test_cancel_right_after_create_and_while_validating(tmp_path, db_path, server):
    client = server.client()
    b = create(client, upload(client, tmp_path, [chat_line(i) for i in range(3)]).id)
    cancelling = client.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done, _ = wait_for_batch(client, b.id, {"cancelled"}, timeout=60)
    assert done.cancelled_at and done.request_counts.completed == 0
    assert query(db_path, "SELECT DISTINCT status FROM items") == [("cancelled",)]
    cancelled = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert {x["error"]["code"] for x in cancelled} == {"batch_cancelled"}
    assert client.batches.cancel(b.id).status == "cancelled"  # again: harmless

    # Cancelled while its file is being validated: the job it makes never runs.
    settings = load_settings({"db": str(db_path)})
    db = open_database(settings.db_url)
    files = FileStore(db_path.parent / "files")
    f = upload(client, tmp_path, [chat_line(0)], "second.jsonl")
    batch = api.create_batch(db, input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, lease_seconds=60)  # fmt: skip
    assert service.cancel(db, batch).state == "cancelling"
    service.validate(db, settings, files, api.get_batch(db, batch.public_id))
    done, _ = wait_for_batch(client, batch.public_id, {"cancelled"}, timeout=60)
    job = api.get_batch(db, batch.public_id).job_id
    assert query(db_path, "SELECT status FROM jobs WHERE id = ?", job) == [("cancelled",)]
    # A bad file cancelled while validating ends cancelled, not failed.
    f = upload(client, tmp_path, ["{not json"], "third.jsonl")
    batch = api.create_batch(db, input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, lease_seconds=60)  # fmt: skip
    service.cancel(db, batch)
    service.validate(db, settings, files, api.get_batch(db, batch.public_id))
    assert client.batches.retrieve(batch.public_id).status == "cancelled"
    db.dispose()


def test_a_finished_batch_cannot_be_cancelled(tmp_path, db_path, server):
    client = server.client()
    b = create(client, upload(client, tmp_path, [chat_line(0, n=2)]).id)
    wait_for_batch(client, b.id, {"completed"}, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.cancel(b.id)
    assert "Cannot cancel a batch with status 'completed'" in caught.value.message


def test_a_full_disk_while_finalizing_is_retried_and_writes_once(
    tmp_path, db_path, models_config, monkeypatch
):
    """The export fails (ENOSPC) once: the batch stays finalizing with no file rows or bytes
    left behind; the next round writes the output once."""
    made = stored_batch(tmp_path, db_path, [chat_line(0), chat_line(1, n=2)])
    settings, db, files, row, batch = made.settings, made.db, made.files, made.input_row, made.batch
    run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE, check=True)

    real_export = service.export_job
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            real_export(*args, **kwargs)  # half the bytes are written, then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(service, "export_job", full_disk)
    assert service.housekeeping(db, settings, files) == 0
    state = service.batch_object(db, api.get_batch(db, batch.public_id))
    assert state["status"] == "finalizing" and state["output_file_id"] is None
    assert query(db_path, "SELECT count(*) FROM api_files") == [(1,)]  # the input only
    assert sorted(p.name for p in files.folder.iterdir()) == [f"{row.id}.jsonl"]
    assert service.housekeeping(db, settings, files) == 0  # not before RETRY_SECONDS
    monkeypatch.setattr(service, "RETRY_SECONDS", 0.0)
    api.update_batch(db, batch.id, lease_until=None)  # as if RETRY_SECONDS had passed
    assert service.housekeeping(db, settings, files) == 1
    state = service.batch_object(db, api.get_batch(db, batch.public_id))
    assert state["status"] == "completed" and state["error_file_id"]
    assert query(db_path, "SELECT count(*), min(bytes) FROM api_files WHERE purpose = "
                 "'batch_output'")[0][0] == 2  # fmt: skip
    assert query(db_path, "SELECT count(*) FROM api_files WHERE bytes < 0") == [(0,)]
    assert service.housekeeping(db, settings, files) == 0  # finalized once
    db.dispose()


def test_a_finalization_cut_short_by_a_dead_server_is_taken_up(tmp_path, db_path, models_config):
    made = stored_batch(tmp_path, db_path, [chat_line(0)])
    settings, db, files, batch = made.settings, made.db, made.files, made.batch
    run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    # A server took it, reserved its output file and died: lease and reservation linger.
    assert api.take_batch(db, batch.id, states=("submitted",), lease_seconds=60)
    dead = api.reserve_file(db, filename="x", purpose="batch_output")
    files.open_new(dead.id).close()
    assert service.housekeeping(db, settings, files) == 0  # held by the dead server's lease
    api.update_batch(db, batch.id, lease_until=None)  # the lease runs out
    with db.write() as conn:  # and the reservation is older than a finalization may take
        conn.exec_driver_sql("UPDATE api_files SET created_at = '2000-01-01' WHERE id = ?",
                             (dead.id,))  # fmt: skip
    assert service.housekeeping(db, settings, files) == 1
    assert service.batch_object(db, api.get_batch(db, batch.public_id))["status"] == "completed"
    assert query(db_path, "SELECT count(*) FROM api_files WHERE bytes < 0") == [(0,)]
    assert not files.path(dead.id).exists()
    db.dispose()


def test_an_input_file_whose_bytes_are_gone_fails_its_batch_alone(tmp_path, db_path, server):
    client = server.client()
    gone = upload(client, tmp_path, [chat_line(0)], "gone.jsonl")
    (row,) = query(db_path, "SELECT id FROM api_files WHERE public_id = ?", gone.id)
    (db_path.parent / "files" / f"{row[0]}.jsonl").unlink()
    failed = create(client, gone.id)
    assert failed.status == "failed"
    assert failed.errors.data[0].code == "file_not_found"
    assert "upload the file again" in failed.errors.data[0].message
    assert str(db_path.parent) not in failed.errors.data[0].message
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.content(gone.id)
    assert "missing on the server" in caught.value.message
    # Later batches are not held up.
    ok = create(client, upload(client, tmp_path, [chat_line(1)]).id)
    assert ok.status == "in_progress"
    run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    assert wait_for_batch(client, ok.id, {"completed"}, timeout=60)[0].status == "completed"
    assert "Traceback" not in server.stop()


def test_a_zero_byte_upload_fails_its_batch_without_server_paths(tmp_path, db_path, server):
    client = server.client()
    empty = client.files.create(file=("empty.jsonl", b""), purpose="batch")
    failed = create(client, empty.id)
    assert failed.status == "failed"
    message = failed.errors.data[0].message
    assert "empty.jsonl" in message and "empty file" in message
    assert str(db_path.parent) not in json.dumps(failed.model_dump())


def test_two_servers_on_one_database_finalize_each_batch_once(tmp_path, db_path, models_config):
    run_cli("db", "upgrade", db_path=db_path)
    one, two = Server(db_path), Server(db_path)
    try:
        clients = [one.client(), two.client()]
        made = [
            create(
                clients[i % 2], upload(clients[i % 2], tmp_path, [chat_line(i)], f"{i}.jsonl").id
            )
            for i in range(10)
        ]
        run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
        for b in made:
            wait_for_batch(clients[0], b.id, {"completed"}, timeout=60)
    finally:
        errors = one.stop() + two.stop()
    assert query(db_path, "SELECT count(*) FROM api_files WHERE purpose = 'batch_output'") == [
        (10,)
    ]
    assert query(db_path, "SELECT count(DISTINCT output_file_id) FROM api_batches") == [(10,)]
    assert len(list((db_path.parent / "files").iterdir())) == 20
    assert "Traceback" not in errors


def test_serve_on_postgresql(tmp_path, pg_url, models_config):
    s = Server(Path("unused"), env={"EXECUTOR_DB": pg_url})
    try:
        client = s.client()
        b = create(client, upload(client, tmp_path, [chat_line(i) for i in range(3)]).id)
        assert b.status == "in_progress"
        run_cli_process("run", "--until-empty", env={**FAKE, "EXECUTOR_DB": pg_url}, check=True)
        done, _ = wait_for_batch(client, b.id, {"completed"}, timeout=60)
        lines = client.files.content(done.output_file_id).text.splitlines()
        assert [json.loads(x)["custom_id"] for x in lines] == ["r0", "r1", "r2"]
    finally:
        err = s.stop()
    assert "KeyError" not in err and "Traceback" not in err


# --- hostile clients ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_key_is_checked_before_a_body_is_read_and_json_bodies_are_capped(
    db_path, models_config
):
    run_cli("db", "upgrade", db_path=db_path)
    s = Server(db_path, "--host", "0.0.0.0", env={"EXECUTOR_API_KEY": KEY})
    try:
        before = rss_kib(s.proc.pid)

        def body():
            for _ in range(200):
                yield b"x" * (1 << 20)  # 200 MB, never wanted

        for path in ("/v1/batches", "/v1/files"):
            try:
                response = httpx.post(s.url + path, content=body(), timeout=30)
                assert response.status_code == 401
            except httpx.HTTPError:
                pass  # the server may close the connection on a body it will not read
        assert rss_kib(s.proc.pid) - before < 50 * 1024
        auth = {"Authorization": f"Bearer {KEY}"}
        big = json.dumps({"input_file_id": "file-x", "metadata": {"k": "v" * (1 << 20)}})
        response = httpx.post(s.url + "/v1/batches", content=big, headers=auth)
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]

        def chunked():
            yield b'{"input_file_id": "'
            for _ in range(100):
                yield b"x" * 4096
            yield b'"}'

        response = httpx.post(s.url + "/v1/batches", content=chunked(), headers=auth)
        assert response.status_code == 413
    finally:
        s.stop()


def test_hostile_uploads_and_bodies_get_clear_400s(tmp_path, db_path, server):
    multipart = {"content-type": "multipart/form-data; boundary=b"}
    garbage = bytes(range(256)) * 64
    response = httpx.post(server.url + "/v1/files", content=garbage, headers=multipart)
    assert response.status_code == 400, response.text
    # No closing boundary: a cut-off upload is not a file.
    open_ended = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                  b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
                  + chat_line(0).encode() + b"\n")  # fmt: skip
    response = httpx.post(server.url + "/v1/files", content=open_ended, headers=multipart)
    assert response.status_code == 400 and "closing boundary" in response.json()["error"]["message"]
    # A client that goes away mid-upload.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                b"boundary=b\r\nContent-Length: 100000\r\n\r\n")  # fmt: skip
        sock.sendall(head + open_ended)
    response = httpx.post(
        server.url + "/v1/batches", content=b"17", headers={"content-type": "application/json"}
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] is None
    assert "JSON object" in error["message"] and "17" not in error["message"]
    response = httpx.post(
        server.url + "/v1/batches", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    wait_for(lambda: query(db_path, "SELECT count(*) FROM api_files") == [(0,)], timeout=10)
    assert list((db_path.parent / "files").iterdir()) == []
    err = server.stop()
    assert "Traceback" not in err and "Exception" not in err


def test_an_api_key_of_spaces_is_refused(db_path):
    for key in (" " * 8, "pass word", "tab\tkey123"):
        done = run_cli_process("serve", env={"EXECUTOR_API_KEY": key}, db_path=db_path)
        assert done.returncode == 2 and "--api-key" in done.stderr


# --- progress -----------------------------------------------------------------------------------


def test_progress_moves_while_the_first_wave_decodes(tmp_path, db_path, tiny_model):
    """60 items at 60 sequences: nothing finishes for a minute, yet tok/s, ETA, the workers
    table and the page's rate line move from the first steps. Every check below is made
    while no result exists yet (the wave takes 60 s; the checks poll until they hold)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": "w " * 30, "max_tokens": 120}) + "\n" for _ in range(60))
    )
    run_cli("submit", str(prompts), "--model", str(tiny_model), db_path=db_path, check=True)
    env = {**FAKE, "EXECUTOR_PARALLEL": "60", "EXECUTOR_FAKE_TOKEN_SECONDS": "0.5",
           "EXECUTOR_PROGRESS_SECONDS": "1"}  # fmt: skip
    worker = start_cli("run", "--until-empty", "--stop-timeout", "1", db_path=db_path, env=env)
    from executor.serve.page import snapshot
    from executor.store import open_database

    db = open_database(f"sqlite:///{db_path}")
    try:

        def nothing_finished() -> bool:
            return query(db_path, "SELECT count(*) FROM results") == [(0,)]

        def live():
            (row,) = json.loads(run_cli("status", "--json", db_path=db_path).stdout or "[{}]")
            moving = row.get("tokens_in_flight", 0) > 0 and row["tokens_per_s"] and row["eta_s"]
            return row if moving and nothing_finished() else None

        row = wait_for(live, timeout=60, what="live tokens before any item finished")
        assert row["completion_tokens"] == 0 and row["counts"]["done"] == 0
        workers = json.loads(run_cli("workers", "--json", db_path=db_path, check=True).stdout)
        assert workers[0]["job_id"] == 1 and workers[0]["model"] == str(tiny_model)

        def line() -> bool:
            timeline = snapshot(db)["jobs"][0]["timeline"]
            return len([p for p in timeline if p[1] > 0]) >= 2 and nothing_finished()

        wait_for(line, timeout=60, what="a tok/s line with two points before any item ended")
    finally:
        db.dispose()
        worker.terminate()
        _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    lines = [x for x in err.splitlines() if "progress job 1: 0/60 items (+" in x]
    assert any(" 0.0 tok/s" not in x and "ETA ?" not in x for x in lines), lines


def test_a_gpu_with_a_cpu_only_build_says_one_thing(tiny_model, monkeypatch):
    card = json.dumps([{"name": "Fake GPU", "uuid": "GPU-fake-0", "total": 24 * 2**30}])
    done = run_cli_process(
        "plan", str(tiny_model), "--json",
        env={"EXECUTOR_FAKE_NVML": card, "EXECUTOR_FAKE_GPU_OFFLOAD": "0"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = " ".join(json.loads(done.stdout)["plan"]["notes"])
    assert "no NVIDIA GPU" not in notes
    assert "Fake GPU is not used (this llama-cpp-python cannot offload)" in notes
    assert "built without GPU offload" in done.stderr


def test_housekeeping_errors_are_one_line_per_batch(tmp_path, db_path, models_config, caplog):
    settings = load_settings({"db": str(db_path)})
    db = open_database(settings.db_url, create=True)
    files = FileStore(tmp_path / "files")
    row = api.reserve_file(db, filename="in.jsonl", purpose="batch")
    api.finish_file(db, row.id, 0)
    stuck = api.create_batch(db, input_file_id=row.public_id, endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, lease_seconds=0)  # fmt: skip
    # Its bytes never existed: validation fails the batch, with one line, no traceback.
    assert service.housekeeping(db, settings, files) == 1
    assert api.get_batch(db, stuck.public_id).state == "failed"
    assert all(r.exc_info is None for r in caplog.records)
    db.dispose()

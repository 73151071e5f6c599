"""`executor serve` against the official `openai` client: a live server on a loopback port,
real `executor run` workers draining the same database, real files.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import query, read_jsonl, run_cli, run_cli_process, start_cli
from tests.serving import KEY, Server, chat_line, free_port, stored_batch, upload, wait_for


def test_openai_client_round_trip_on_the_default_model(tmp_path, db_path, server):
    client = server.client()
    f = upload(client, tmp_path, [chat_line(i) for i in range(3)])
    assert f.id.startswith("file-") and f.purpose == "batch" and f.filename == "requests.jsonl"
    assert client.files.retrieve(f.id).bytes == (tmp_path / "requests.jsonl").stat().st_size
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"night": "1"},
    )  # fmt: skip
    # Validated before create answers: a worker started the moment after finds the job
    # (a cron line `executor run --until-empty` right after a client's create did nothing
    # while validation ran in the background).
    assert b.status == "in_progress" and b.metadata == {"night": "1"}
    assert b.request_counts.total == 3
    worker = run_cli_process("run", "--until-empty", db_path=db_path, env={"EXECUTOR_CTX": "512"})
    assert worker.returncode == 0, worker.stderr
    done, _ = wait_for(client, b.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    assert done.request_counts.total == 3 and done.request_counts.completed == 3
    assert done.error_file_id is None and done.completed_at >= done.created_at
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in lines] == ["r0", "r1", "r2"]
    job_id = query(db_path, "SELECT job_id FROM api_batches")[0][0]
    ours = read_jsonl(
        run_cli("export", str(job_id), "--format", "openai", db_path=db_path, check=True).stdout
    )
    for line, expected in zip(lines, ours, strict=True):
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert (
            body["choices"][0]["message"] == expected["response"]["body"]["choices"][0]["message"]
        )
    listed = client.batches.list(limit=10)
    assert [x.id for x in listed.data] == [b.id]
    assert {x.id for x in client.files.list().data} == {f.id, done.output_file_id}


def test_cancel_mid_run_keeps_what_was_done(tmp_path, db_path, server):
    client = server.client()
    f = upload(client, tmp_path, [chat_line(i) for i in range(60)])
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")  # fmt: skip
    env = {"EXECUTOR_ENGINE": "fake", "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05",
           "EXECUTOR_PARALLEL": "2"}  # fmt: skip
    worker = start_cli("run", db_path=db_path, env=env)
    try:
        deadline = time.monotonic() + 60
        while client.batches.retrieve(b.id).request_counts.completed < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        cancelling = client.batches.cancel(b.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done, _ = wait_for(client, b.id, {"cancelled"}, timeout=60)
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    assert done.cancelled_at and done.cancelling_at
    assert 2 <= done.request_counts.completed < 60
    out = client.files.content(done.output_file_id).text.splitlines()
    good = [json.loads(x) for x in out if json.loads(x)["response"]]
    assert len(good) == done.request_counts.completed
    assert client.batches.cancel(b.id).status == "cancelled"  # twice: harmless


def test_a_bad_file_fails_with_its_line_errors(tmp_path, db_path, server):
    """What OpenAI refuses a whole file for: not JSON, another endpoint, a bad envelope, a
    duplicate custom_id. The batch is failed when create answers."""
    client = server.client()
    lines = [chat_line(0), "{not json", chat_line(2, url="/v1/completions"),
             chat_line(3, temperature="hot")]  # fmt: skip
    f = upload(client, tmp_path, lines)
    failed = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")  # fmt: skip
    assert failed.status == "failed" and failed.failed_at
    assert [(e.code, e.line) for e in failed.errors.data] == [("mismatched_endpoint", 3)]
    # With the url right, the other bad lines are named with their numbers; a bad request
    # (temperature "hot") is not the file's fault.
    lines[2] = chat_line(2)
    lines.append(json.dumps({"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "smollm2", "messages": []}}))  # fmt: skip
    lines.append(json.dumps({"custom_id": "r9", "method": "GET", "url": "/v1/chat/completions",
                             "body": {}}))  # fmt: skip
    f = upload(client, tmp_path, lines, "second.jsonl")
    failed = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")  # fmt: skip
    assert failed.status == "failed"
    assert [e.line for e in failed.errors.data] == [2, 5, 6]
    assert "duplicate custom_id 'r0'" in failed.errors.data[1].message
    assert "method" in failed.errors.data[2].message
    assert str(tmp_path) not in json.dumps(failed.model_dump())
    assert query(db_path, "SELECT count(*) FROM jobs") == [(0,)]


def test_requests_openai_would_refuse(tmp_path, server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-" + "0" * 24, endpoint="/v1/chat/completions",
                              completion_window="24h")  # fmt: skip
    f = upload(client, tmp_path, [chat_line(0)])
    for bad in ({"endpoint": "/v1/embeddings"}, {"completion_window": "1h"},
                {"metadata": {"k": 1}}):  # fmt: skip
        args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", **bad}  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.batches.create(**args)
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


# --- security ----------------------------------------------------------------------------------


def test_odd_ids_are_404_and_never_paths(tmp_path, server):
    (tmp_path / "secret.txt").write_text("secret")
    for path in ("/v1/files/../../etc/passwd", "/v1/files/..%2F..%2Fetc%2Fpasswd/content",
                 "/v1/files/file-../content", "/v1/files/%2e%2e/content",
                 "/v1/files/file-000000000000000000000000/content",
                 "/v1/batches/batch_zzz", "/v1/batches/..%2Ffiles", "/static/..%2Fcli.py",
                 "/v1/files/1/content"):  # fmt: skip
        response = httpx.get(server.url + path)
        assert response.status_code == 404, path
        assert "secret" not in response.text and "Traceback" not in response.text


def test_an_upload_over_the_limit_is_413_and_nothing_is_kept(tmp_path, db_path, models_config):
    run_cli("db", "upgrade", db_path=db_path)
    s = Server(db_path, "--max-upload", "2KiB")
    try:
        big = (chat_line(0) + "\n") * 40
        with pytest.raises(openai.APIStatusError) as caught:
            s.client().files.create(file=("big.jsonl", big.encode()), purpose="batch")
        assert caught.value.status_code == 413

        # The same without a Content-Length (chunked): stopped at the limit as it streams.
        def chunks() -> Iterator[bytes]:
            yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
            for _ in range(100):
                yield b"x" * 1000
            yield b"\r\n--b--\r\n"

        multipart = {"content-type": "multipart/form-data; boundary=b"}
        response = httpx.post(s.url + "/v1/files", content=chunks(), headers=multipart)
        assert response.status_code == 413
        small = s.client().files.create(file=("ok.jsonl", b"{}\n"), purpose="batch")
    finally:
        s.stop()
    assert query(db_path, "SELECT public_id FROM api_files") == [(small.id,)]
    assert [p.name for p in (db_path.parent / "files").iterdir()] == ["1.jsonl"] or len(
        list((db_path.parent / "files").iterdir())
    ) == 1


def test_a_key_is_required_off_loopback_and_checked_everywhere(db_path, models_config):
    run_cli("db", "upgrade", db_path=db_path)
    refused = run_cli_process("serve", "--host", "0.0.0.0", "--port", str(free_port()),
                              db_path=db_path, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "--api-key" in refused.stderr
    s = Server(db_path, "--host", "0.0.0.0", env={"EXECUTOR_API_KEY": KEY})
    try:
        for path in ("/", "/api/status", "/v1/files", "/v1/batches", "/static/page.js"):
            response = httpx.get(s.url + path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == 'Basic realm="executor"'
            assert (
                httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}).status_code
                == 401
            )
            assert (
                httpx.get(s.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code
                == 200
            )
            assert httpx.get(s.url + path, auth=("any", KEY)).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").batches.list()
        assert s.client(KEY).batches.list().data == []
        assert (
            "access-control-allow-origin"
            not in httpx.get(
                s.url + "/v1/batches",
                headers={"Authorization": f"Bearer {KEY}", "Origin": "http://x"},
            ).headers
        )
    finally:
        err = s.stop()
    assert KEY not in err


# --- load ---------------------------------------------------------------------------------------


def test_fifty_clients_at_once(tmp_path, db_path, server):
    """50 clients upload and create batches while a worker drains: every batch completes,
    none is lost or duplicated; p99 of GET /v1/batches/{id} is printed."""
    env = {"EXECUTOR_ENGINE": "fake", "EXECUTOR_PARALLEL": "4"}
    worker = start_cli("run", db_path=db_path, env=env)
    latencies: list[float] = []
    lock = threading.Lock()

    def one(n: int) -> tuple[str, str]:
        client = server.client()
        f = client.files.create(
            file=(f"c{n}.jsonl", "".join(chat_line(n * 10 + i) + "\n" for i in range(3)).encode()),
            purpose="batch",
        )
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
        deadline = time.monotonic() + 240
        while True:
            started = time.perf_counter()
            batch = client.batches.retrieve(b.id)
            with lock:
                latencies.append(time.perf_counter() - started)
            if batch.status in ("completed", "failed") or time.monotonic() > deadline:
                return b.id, batch.status
            time.sleep(0.25)

    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            outcomes = list(pool.map(one, range(50)))
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    assert len({b for b, _ in outcomes}) == 50
    assert {s for _, s in outcomes} == {"completed"}
    assert query(db_path, "SELECT count(*), count(DISTINCT job_id) FROM api_batches") == [(50, 50)]
    assert query(db_path, "SELECT count(*) FROM items") == [(150,)]
    assert query(db_path, "SELECT count(*), count(DISTINCT item_id) FROM results") == [(150, 150)]
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"\n50 clients: {len(latencies)} GET /v1/batches/{{id}}: median "
          f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")  # fmt: skip


# --- energy ------------------------------------------------------------------------------------


def test_energy_per_job_from_nvml(tmp_path, db_path, tiny_model):
    card = json.dumps([{"name": "Fake GPU", "uuid": "GPU-fake-0", "total": 24 * 2**30,
                        "watts": 300}])  # fmt: skip
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"item {i}"}) + "\n" for i in range(6)))
    run_cli("submit", str(prompts), "--model", str(tiny_model), db_path=db_path, check=True)
    env = {"EXECUTOR_ENGINE": "fake", "EXECUTOR_FAKE_NVML": card,
           "EXECUTOR_FAKE_TOKEN_SECONDS": "0.02"}  # fmt: skip
    run_cli_process("run", "--until-empty", db_path=db_path, env=env, check=True)
    (row,) = json.loads(run_cli("status", "--json", db_path=db_path, check=True).stdout)
    assert row["energy_source"] == "nvml:GPU-fake-0"
    assert row["energy_wh"] > 0 and row["joules_per_token"] > 0
    exported = read_jsonl(
        run_cli("export", "1", "--with-provenance", db_path=db_path, check=True).stdout
    )
    assert exported[0]["provenance"]["job_energy"]["energy_wh"] == row["energy_wh"]
    table = run_cli("status", db_path=db_path, check=True).stdout
    assert "Wh" in table and "J/tok" in table


def test_energy_is_unknown_without_a_counter(tmp_path, db_path, tiny_model, monkeypatch):
    from executor.machine import energy

    monkeypatch.setattr(energy, "RAPL", tmp_path / "no-powercap")
    assert energy.meter(None, None) is None
    zone = tmp_path / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    monkeypatch.setattr(energy, "RAPL", tmp_path / "powercap")
    m = energy.meter(None, None)
    assert m is not None and m.source == "rapl" and m.read() == 999
    (zone / "energy_uj").write_text("1000\n")  # wrapped around
    assert m.read() == 1001
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    run_cli("submit", str(prompts), "--model", str(tiny_model), db_path=db_path, check=True)
    run_cli_process("run", "--until-empty", db_path=db_path,
                    env={"EXECUTOR_ENGINE": "fake"}, check=True)  # fmt: skip
    (row,) = json.loads(run_cli("status", "--json", db_path=db_path, check=True).stdout)
    if not any(Path("/sys/class/powercap").glob("intel-rapl:[0-9]*/energy_uj")):
        assert row["energy_source"] == "unknown" and row["energy_wh"] is None


def test_malformed_requests_get_openai_errors(server):
    for method, path, kwargs in (
        ("POST", "/v1/batches", {"content": b"{", "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/batches", {"json": ["a list"]}),
        ("GET", "/v1/batches?limit=abc", {}),
        ("GET", "/v1/batches?limit=0", {}),
        ("POST", "/v1/files", {"content": b"x", "headers": {"content-type": "text/plain"}}),
        ("POST", "/v1/files", {"files": {"purpose": (None, "batch")}}),
    ):  # fmt: skip
        response = httpx.request(method, server.url + path, **kwargs)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
    assert httpx.get(server.url + "/v1/files").json()["data"] == []


def test_a_store_that_cannot_be_written_is_507_and_nothing_is_kept(
    tmp_path, db_path, models_config
):
    run_cli("db", "upgrade", db_path=db_path)
    (db_path.parent / "files").write_text("a file where the folder should be")
    s = Server(db_path)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            s.client().files.create(file=("ok.jsonl", b"{}\n"), purpose="batch")
    finally:
        err = s.stop()
    assert caught.value.status_code == 507
    assert "could not store the file" in caught.value.message
    assert query(db_path, "SELECT count(*) FROM api_files") == [(0,)]
    assert "upload not stored" in err


def test_lists_page_as_the_client_expects(tmp_path, server):
    client = server.client()
    made = [upload(client, tmp_path, [chat_line(i)], f"f{i}.jsonl").id for i in range(5)]
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == made[::-1][:2] and first.has_more
    assert [f.id for f in client.files.list(limit=2)] == made[::-1]  # the client pages on
    assert [f.id for f in client.files.list(limit=2, order="asc")] == made
    batches = [
        client.batches.create(input_file_id=f, endpoint="/v1/chat/completions",
                              completion_window="24h").id
        for f in made[:3]
    ]  # fmt: skip
    assert [b.id for b in client.batches.list(limit=1)] == batches[::-1]


def test_a_batch_validated_twice_is_one_job_and_one_file_in_two_batches_is_two(
    tmp_path, db_path, models_config
):
    """A server stopped between submitting a batch's job and marking the batch finds the same
    job when it validates again; the same bytes in two batches are two jobs."""
    from executor.serve import batches as service
    from executor.store import api

    made = stored_batch(tmp_path, db_path, [chat_line(0)])
    settings, db, files, row, first = made.settings, made.db, made.files, made.input_row, made.batch
    again = api.get_batch(db, first.public_id)
    assert again is not None and again.state == "submitted"
    api.update_batch(db, first.id, state="validating", job_id=None)  # as if never marked
    service.validate(db, settings, files, api.get_batch(db, first.public_id))
    assert api.get_batch(db, first.public_id).job_id == again.job_id
    second = api.create_batch(db, input_file_id=row.public_id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata=None, lease_seconds=60)  # fmt: skip
    service.validate(db, settings, files, second)
    assert api.get_batch(db, second.public_id).job_id != again.job_id
    assert query(db_path, "SELECT count(*) FROM jobs") == [(2,)]
    db.dispose()


def test_a_port_in_use_is_one_clear_line(db_path, server):
    taken = run_cli_process("serve", "--port", str(server.port), db_path=db_path, timeout=60)
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in taken.stderr
    assert "--port" in taken.stderr and "Traceback" not in taken.stderr

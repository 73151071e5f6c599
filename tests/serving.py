"""What tests of `executor serve` share: a live server on a loopback port, the official
`openai` client against it, request lines and polling."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from tests.helpers import start_cli

KEY = "s3cret-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_cli("serve", "--port", str(self.port), *args, db_path=db_path, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"serve exited {self.proc.returncode}: {self.proc.stderr.read()}"
                )
            try:
                httpx.get(self.url + "/static/page.css", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("serve did not start")

    def client(self, key: str = "local") -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


def chat_line(i: int, url: str = "/v1/chat/completions", **body: Any) -> str:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": f"Say {i}."}],
            "max_tokens": 8, **body}  # fmt: skip
    return json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body})


def upload(client: OpenAI, tmp_path: Path, lines: list[str], name: str = "requests.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch")


@dataclass
class StoredBatch:
    """A batch made through the store as the server makes one, with no server running."""

    settings: Any
    db: Any
    files: Any
    input_row: Any
    batch: Any


def stored_batch(tmp_path: Path, db_path: Path, lines: list[str]) -> StoredBatch:
    """Store `lines` as an uploaded file, create a batch of it and validate it (its job is
    queued). The caller disposes of `.db`."""
    from executor.config import load_settings
    from executor.serve import batches as service
    from executor.serve.files import FileStore
    from executor.store import api, open_database

    settings = load_settings({"db": str(db_path)})
    db = open_database(settings.db_url, create=True)
    files = FileStore(tmp_path / "files")
    row = api.reserve_file(db, filename="in.jsonl", purpose="batch")
    with files.open_new(row.id) as f:
        f.write("".join(line + "\n" for line in lines).encode())
    api.finish_file(db, row.id, files.path(row.id).stat().st_size)
    batch = api.create_batch(db, input_file_id=row.public_id, endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, lease_seconds=60)  # fmt: skip
    service.validate(db, settings, files, batch)
    return StoredBatch(settings, db, files, row, batch)


def wait_for(client: OpenAI, batch_id: str, states: set[str], timeout: float = 240):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in states:
            return batch, seen
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} stayed {seen}")

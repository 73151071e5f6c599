"""Checks an installed executor (scripts/smoke-wheel runs it with the fresh venv's Python).

Standard library only: the venv holds executor and its runtime dependencies, nothing of the
dev extras. Every command's --help; `db upgrade`; submit → run → export on the default
model; `executor serve` answering the Batch API through to a completed batch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

WORK = Path(sys.argv[1])
VENV = WORK / "venv"
EXE = str(VENV / "bin" / "executor")
DB = WORK / "smoke" / "executor.db"
ENV = {**os.environ, "EXECUTOR_DB": str(DB)}


def sh(*args: str, ok: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([EXE, *args], capture_output=True, text=True, env=ENV, **kw)
    if ok and done.returncode != 0:
        sys.exit(f"smoke: `executor {' '.join(args)}` exited {done.returncode}:\n{done.stderr}")
    return done


def commands(help_text: str) -> list[str]:
    """The command names listed under 'Commands:' in a --help page."""
    names, listing = [], False
    for line in help_text.splitlines():
        if line.strip().startswith("Commands"):
            listing = True
            continue
        if listing and (found := re.match(r"\s{2}([a-z][a-z-]*)\b", line)):
            names.append(found[1])
    return names


def check_install() -> None:
    import executor

    where = Path(executor.__file__).resolve()
    if VENV.resolve() not in where.parents:
        sys.exit(f"smoke: executor was imported from {where}, not from the installed wheel")
    print(f"smoke: executor {executor.__version__} from {where.parent}")


def check_help() -> None:
    top = commands(sh("--help").stdout)
    if len(top) < 10 or "serve" not in top:
        sys.exit(f"smoke: --help lists {top}")
    checked = 0
    for name in top:
        page = sh(name, "--help").stdout
        checked += 1
        for sub in commands(page):
            sh(name, sub, "--help")
            checked += 1
    print(f"smoke: --help of {checked} commands")


def check_db() -> None:
    sh("db", "upgrade")
    print(f"smoke: db upgrade → {sh('db', 'revision').stdout.strip()}")


def check_pipeline() -> None:
    prompts = WORK / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"custom_id": f"q{i}", "prompt": f"Count to {i}:", "max_tokens": 6}) + "\n"
            for i in range(3)
        )
    )
    job = sh("submit", str(prompts)).stdout.strip()
    sh("run", "--until-empty", "--ctx", "512")
    out = WORK / "results.jsonl"
    sh("export", job, "-o", str(out))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    if [r["custom_id"] for r in rows] != ["q0", "q1", "q2"] or any(
        r["status"] != "done" or not r["output"] for r in rows
    ):
        sys.exit(f"smoke: export gave {rows}")
    print(f"smoke: submit → run → export: job {job}, {len(rows)} results on the default model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> dict:
    """A JSON answer; a file's content as {"text": ...}."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
        is_json = response.headers.get("content-type", "").startswith("application/json")
    return json.loads(body) if is_json else {"text": body.decode()}


def check_serve() -> None:
    model = subprocess.run(
        [EXE, "model", "--json"], capture_output=True, text=True, env=ENV, check=True
    )
    path = json.loads(model.stdout)["path"]
    config = WORK / "config.yaml"
    config.write_text(json.dumps({"models": {"smollm2": path}}))
    env = {**ENV, "EXECUTOR_CONFIG": str(config)}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [EXE, "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                sys.exit(f"smoke: serve exited {server.returncode}: {server.stderr.read()}")
            try:
                call(base + "/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    sys.exit("smoke: serve did not answer in 60 s")
                time.sleep(0.2)
        lines = "".join(
            json.dumps({
                "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "smollm2", "max_tokens": 6,
                         "messages": [{"role": "user", "content": f"Say {i}."}]},
            }) + "\n"
            for i in range(2)
        )  # fmt: skip
        boundary = uuid.uuid4().hex
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="requests.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n{lines}\r\n'
            f"--{boundary}--\r\n"
        ).encode()
        uploaded = call(
            base + "/v1/files", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        batch = call(
            base + "/v1/batches",
            json.dumps(
                {
                    "input_file_id": uploaded["id"],
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                }
            ).encode(),
            {"Content-Type": "application/json"},
        )
        worker = subprocess.run(
            [EXE, "run", "--until-empty", "--ctx", "512"], env=env, capture_output=True, text=True
        )
        if worker.returncode != 0:
            sys.exit(f"smoke: the worker exited {worker.returncode}: {worker.stderr}")
        deadline = time.monotonic() + 60
        while (state := call(f"{base}/v1/batches/{batch['id']}"))["status"] != "completed":
            if state["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
                sys.exit(f"smoke: the batch is {state['status']}: {state}")
            time.sleep(0.2)
        text = call(f"{base}/v1/files/{state['output_file_id']}/content")["text"]
        answers = [json.loads(x) for x in text.splitlines()]
        if [a["response"]["status_code"] for a in answers] != [200, 200]:
            sys.exit(f"smoke: the output file holds {answers}")
        print(f"smoke: serve: batch {batch['id']} completed with {len(answers)} answers")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    os.chdir(WORK)
    check_install()
    check_help()
    check_db()
    check_pipeline()
    check_serve()
    print("smoke: the installed wheel works")

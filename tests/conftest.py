"""Shared fixtures: an isolated app folder per test, the CLI as a real subprocess, models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from executor.config import load_settings
from executor.models import DEFAULT_MODEL, default_model_candidates
from executor.store import Database, open_database
from tests.pg_server import PgServer
from tests.synthetic_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every XDG folder at tmp_path and drop the caller's EXECUTOR_* settings.

    The default model is found through the installed package, not the XDG folder, so it
    stays visible.
    """
    for key in list(os.environ):
        if key.startswith("EXECUTOR_"):
            monkeypatch.delenv(key)
    for kind in ("DATA", "STATE", "CONFIG", "CACHE"):
        folder = tmp_path / "xdg" / kind.lower()
        folder.mkdir(parents=True)
        monkeypatch.setenv(f"XDG_{kind}_HOME", str(folder))
    return tmp_path


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{db_path}")
    yield database
    database.dispose()


class PgDatabases:
    """Fresh PostgreSQL databases for tests, copied from a template already at head."""

    def __init__(self, admin_url: str) -> None:
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.count = 0
        with self.admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS executor_template")
            conn.exec_driver_sql("CREATE DATABASE executor_template")
        open_database(self.url("executor_template")).dispose()

    def url(self, name: str) -> str:
        return self.admin.url.set(database=name).render_as_string(hide_password=False)

    def create(self, blank: bool = False) -> str:
        self.count += 1
        name = f"executor_test_{os.getpid()}_{self.count}"
        template = "template0" if blank else "executor_template"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE {template}")
        return self.url(name)

    def drop(self, url: str) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(
                f"DROP DATABASE IF EXISTS {sa.make_url(url).database} WITH (FORCE)"
            )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgDatabases]:
    """A PostgreSQL server for the session (EXECUTOR_TEST_PG_URL, or a throwaway one)."""
    external = os.environ.get("EXECUTOR_TEST_PG_URL")
    server = None if external else PgServer()
    try:
        databases = PgDatabases(external or server.url())
        yield databases
        databases.admin.dispose()
    finally:
        if server is not None:
            server.stop()


@pytest.fixture
def pg_url(postgres: PgDatabases) -> Iterator[str]:
    """A fresh PostgreSQL database at head, dropped afterwards."""
    url = postgres.create()
    yield url
    postgres.drop(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Database]:
    """The same queue tests on both backends (as huey tests its storages)."""
    if request.param == "sqlite":
        database = open_database(f"sqlite:///{db_path}")
    else:
        database = open_database(request.getfixturevalue("pg_url"))
    yield database
    database.dispose()


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A small, valid GGUF file (for the fake engine, which never reads weights)."""
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real default model; its absence is a failure, never a skip."""
    for path in default_model_candidates():
        if path.is_file():
            return path
    pytest.fail(f"default model missing: {DEFAULT_MODEL.install_hint}")


def settings_for(db_path: Path, **flags: object):
    """Settings as the CLI would build them, pointed at a test database."""
    return load_settings({"db": str(db_path), **flags})


def run_cli(
    *args: str,
    db_path: Path | None = None,
    input: str | bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m executor ARGS` as a real process (stdin `input`, extra `env`)."""
    full_env = {**os.environ, **(env or {})}
    if db_path is not None:
        full_env["EXECUTOR_DB"] = str(db_path)
    # Bytes in and out, so that tests can feed invalid UTF-8.
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        [sys.executable, "-m", "executor", *args],
        input=data,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    result = subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"executor {' '.join(args)} exited {result.returncode}\n{result.stderr}"
        )
    return result


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path | str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8") if isinstance(path, Path) else path
    return [json.loads(line) for line in text.splitlines() if line.strip()]

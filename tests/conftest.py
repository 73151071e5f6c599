"""Fixtures: an isolated app folder per test, databases on both backends, models.
Helpers that tests call live in tests/helpers.py."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from executor import redact
from executor.gguf.models import DEFAULT_MODEL, default_model_candidates
from executor.store import Database, open_database
from tests.helpers import run_cli
from tests.pg_server import PgDatabases, PgServer
from tests.serving import Server
from tests.slurm_cluster import SlurmCluster
from tests.synthetic_gguf import write_tiny_gguf


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point every XDG folder at tmp_path and drop the caller's EXECUTOR_* settings.

    The default model is found through the installed package, not the XDG folder, so it
    stays visible.
    """
    for key in list(os.environ):
        if key.startswith("EXECUTOR_"):
            monkeypatch.delenv(key)
    # Plans for a fake GPU on this CPU-only build plan for the GPU; tests/test_gpu_build.py
    # drops this to see what a user with a card and a CPU build sees.
    monkeypatch.setenv("EXECUTOR_FAKE_GPU_OFFLOAD", "1")
    # Passwords an in-process command remembered are masked for the rest of the process: a
    # test's random password ("0000") must not mask the next test's output.
    monkeypatch.setattr(redact, "_known", set())
    for kind in ("DATA", "STATE", "CONFIG", "CACHE"):
        folder = tmp_path / "xdg" / kind.lower()
        folder.mkdir(parents=True)
        monkeypatch.setenv(f"XDG_{kind}_HOME", str(folder))
    yield tmp_path
    # In-process commands configure the root logger with their captured stderr: drop it.
    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{db_path}")
    yield database
    database.dispose()


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


@pytest.fixture
def models_config(tmp_path: Path, default_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`models:` maps the name OpenAI lines use to the default model."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"smollm2": str(default_model)}}))
    monkeypatch.setenv("EXECUTOR_CONFIG", str(path))
    return path


@pytest.fixture
def server(db_path: Path, models_config: Path) -> Iterator[Server]:
    run_cli("db", "upgrade", db_path=db_path)
    s = Server(db_path)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A one-node Slurm cluster for the session (scripts/ensure-slurm); skipped, saying why,
    only where it cannot start (not root, no packages to be had)."""
    try:
        cluster = SlurmCluster()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"Slurm cannot start here: {exc}")
    yield cluster
    cluster.stop()

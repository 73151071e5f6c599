"""Settings precedence: flag > EXECUTOR_* env > config file > defaults; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from executor.config import load_settings, xdg_dir
from executor.errors import ConfigError


def write_config(text: str) -> Path:
    path = xdg_dir("config") / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_precedence_flag_over_env_over_file_over_default(monkeypatch: pytest.MonkeyPatch):
    path = write_config("ctx: 1024\nbatch_size: 4\nmax_tokens: 99\n")
    monkeypatch.setenv("EXECUTOR_CTX", "2048")
    monkeypatch.setenv("EXECUTOR_BATCH_SIZE", "8")
    settings = load_settings({"ctx": 512})
    assert (settings.ctx, settings.batch_size, settings.max_tokens, settings.top_p) == (
        512,
        8,
        99,
        1.0,
    )
    assert settings.sources["ctx"] == "flag"
    assert settings.sources["batch_size"] == "env EXECUTOR_BATCH_SIZE"
    assert settings.sources["max_tokens"] == f"file {path}"
    assert settings.sources["top_p"] == "default"


def test_default_database_is_under_xdg_data_home():
    settings = load_settings()
    assert settings.db == str(xdg_dir("data") / "executor.db")
    assert settings.db_url == f"sqlite:///{xdg_dir('data') / 'executor.db'}"


def test_db_accepts_a_url_or_a_path(tmp_path: Path):
    assert (
        load_settings({"db": "postgresql+psycopg://u@h/d"}).db_url == "postgresql+psycopg://u@h/d"
    )
    assert load_settings({"db": str(tmp_path / "q.db")}).db_url == f"sqlite:///{tmp_path / 'q.db'}"


def test_unknown_key_in_file_names_key_and_file():
    path = write_config("ctxx: 5\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown setting 'ctxx'"):
        load_settings()


def test_bad_value_names_its_source(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EXECUTOR_BATCH_SIZE", "many")
    with pytest.raises(ConfigError, match="EXECUTOR_BATCH_SIZE: expected an integer"):
        load_settings()
    write_config("temperature: 9\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: temperature: must be at least 0\.0"):
        load_settings({"batch_size": 3}, env={})


def test_named_config_file_must_exist(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config=str(tmp_path / "nope.yaml"))


def test_gpu_layers_forms():
    assert load_settings({"gpu_layers": "auto"}).gpu_layers == "auto"
    assert load_settings({"gpu_layers": "all"}).gpu_layers == -1
    assert load_settings({"gpu_layers": "12"}).gpu_layers == 12
    with pytest.raises(ConfigError, match="--gpu-layers"):
        load_settings({"gpu_layers": "lots"})

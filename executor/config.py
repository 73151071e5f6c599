"""Settings: flag > EXECUTOR_* environment > YAML config file > defaults, validated in one place."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from executor.errors import ConfigError
from executor.params import INTEGER_PARAMS, JOB_PARAMS, KV_CACHE_TYPES, PARAM_BOUNDS
from executor.paths import load_yaml, read_text
from executor.redact import mask_url, remember
from executor.units import parse_cap, parse_size
from executor.windows import Window


def xdg_dir(kind: str) -> Path:
    """The XDG base directory of `kind` (data, state, config, cache) for executor."""
    env, fallback = {
        "data": ("XDG_DATA_HOME", ".local/share"),
        "state": ("XDG_STATE_HOME", ".local/state"),
        "config": ("XDG_CONFIG_HOME", ".config"),
        "cache": ("XDG_CACHE_HOME", ".cache"),
    }[kind]
    base = os.environ.get(env) or str(Path.home() / fallback)
    return Path(base) / "executor"


# --- value parsers: each takes a str (env, flag) or a YAML value and returns the typed value ----


def _number(kind: type, minimum: float, maximum: float | None = None) -> Callable[[Any], Any]:
    """A parser of an int or a float within [minimum, maximum]; finite numbers only."""
    noun = "an integer" if kind is int else "a number"

    def parse(value: Any) -> Any:
        if isinstance(value, bool) or (
            kind is int and isinstance(value, float) and not value.is_integer()
        ):
            raise ValueError(f"expected {noun}, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"expected {noun}, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        if number < minimum or (maximum is not None and number > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise ValueError(f"must be at least {minimum}{upper}, got {number}")
        return number

    return parse


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    return _number(int, minimum, maximum)


def _float(minimum: float, maximum: float | None = None) -> Callable[[Any], float]:
    return _number(float, minimum, maximum)


def _param(name: str) -> Callable[[Any], Any]:
    """A generation parameter, within the bounds a prompt line has too."""
    low, high = PARAM_BOUNDS[name]
    if name in INTEGER_PARAMS:
        return _int(int(low), None if high is None else int(high))
    return _float(low, high)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool) or str(value) == "":
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return str(value)


def _aliases(value: Any) -> dict[str, str]:
    """`models:` — names (as OpenAI batch files give them) → GGUF paths; JSON text in env."""
    if value is None:  # `models:` with every entry commented out
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                "expected a mapping of model names to GGUF paths (JSON in the environment)"
            ) from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
    ):
        raise ValueError("expected a mapping of model names to GGUF paths")
    return {name: str(Path(path).expanduser()) for name, path in value.items()}


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return parse(value)

    return wrapped


def _window(value: Any) -> str:
    """A time window ("22:00-07:00,12:30-13:30"), checked, kept as written."""
    return Window.parse(_text(value)).text


def _bytes(value: Any) -> int:
    return parse_size(_text(value))


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _cap(value: Any) -> str:
    text = str(value).strip()
    parse_cap(text)  # validates: raises ValueError with the accepted forms
    return text


def _auto_or(parse: Callable[[Any], int]) -> Callable[[Any], int | str]:
    """`auto`, or a number the parser accepts."""

    def wrapped(value: Any) -> int | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return parse(value)

    return wrapped


_parallel = _auto_or(_int(1))


def _threads(value: Any) -> int | str:
    return "auto" if value is None else _auto_or(_int(1))(value)


def _gpu_layers(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().lower() == "all":
        return -1
    number = _int(-1)(value)
    return number


# Settings whose command-line flag is not their name with dashes.
FLAG_NAMES = {"n_ubatch": "--ubatch"}


@dataclass(frozen=True)
class Option:
    """One setting: its parser, default and a line of help (shown by `config show`)."""

    parse: Callable[[Any], Any]
    default: Any
    help: str


OPTIONS: dict[str, Option] = {
    "db": Option(_text, None, "database: a path (SQLite) or a SQLAlchemy URL"),
    "model": Option(
        _optional(_text), None, "GGUF model path or a name from `models`; unset = the default model"
    ),
    "models": Option(_aliases, {}, "model names → GGUF paths (OpenAI batch files name models)"),
    "engine": Option(_choice("llama", "fake"), "llama", "llama (real) or fake (tests, dry runs)"),
    "ctx": Option(
        _auto_or(_int(64)),
        "auto",
        "tokens per sequence: auto (the job's longest prompt + its max_tokens) or a number",
    ),
    "gpu_layers": Option(
        _gpu_layers, "auto", "layers on the GPU: auto (planned), all, or a number"
    ),
    "gpu": Option(_int(0), 0, "the GPU this worker uses (nvidia-smi's index)"),
    "vram_cap": Option(_optional(_cap), None, "VRAM ceiling: 11.5GiB, 12GB, bytes or 90%"),
    "parallel": Option(
        _parallel, "auto", "sequences decoded together: auto (from the plan) or a number"
    ),
    "flash_attn": Option(
        _choice("auto", "on", "off"), "auto", "flash attention: auto (on with GPU offload), on, off"
    ),
    "cache_type": Option(_choice(*KV_CACHE_TYPES), "f16", "KV cache element type"),
    "n_batch": Option(_int(32), 512, "logical batch size (tokens per decode call)"),
    "n_ubatch": Option(
        _auto_or(_int(32)),
        "auto",
        "physical batch: auto (512; on a GPU up to 2048 when it costs no block) or a number",
    ),
    "swa_full": Option(
        _choice("auto", "on", "off"),
        "auto",
        "sliding-window layers keep the whole context: auto (on without a GPU), on, off",
    ),
    "placement": Option(
        _choice("tensors", "layers"),
        "tensors",
        "tensors (MoE experts to RAM first, then partial blocks) or layers (whole layers)",
    ),
    "allow_swap": Option(_bool, False, "load even if the CPU part does not fit in RAM"),
    "allow_cpu": Option(
        _bool, False, "run on the CPU when gpu_layers asks for a GPU this build cannot use"
    ),
    "backoff_seconds": Option(_float(0.0), 2.0, "first wait before reloading after an OOM"),
    "shrink_step": Option(_float(0.01, 1.0), 0.1, "fraction of GPU layers dropped per OOM"),
    "shrink_parallel_first": Option(
        _bool, False, "on OOM, halve the parallel sequences before the layers"
    ),
    "threads": Option(
        _threads,
        "auto",
        "CPU threads for llama.cpp (single-token and batch steps): auto (physical cores this "
        "process may use) or a number",
    ),
    "batch_size": Option(
        _optional(_int(1)), None, "items claimed at a time; unset = 4 × parallel, at least 16"
    ),
    "lease_seconds": Option(_int(10), 120, "how long a claim lasts without a heartbeat"),
    "poll_seconds": Option(_float(0.05), 5.0, "wait between looks at an empty queue"),
    "max_attempts": Option(_int(1), 3, "crashes of the model process an item may cause"),
    "stall_seconds": Option(
        _float(1.0), 600.0, "a model process silent this long with items in flight is killed"
    ),
    "progress_seconds": Option(_float(0.1), 10.0, "interval of progress log lines (no terminal)"),
    "stop_timeout": Option(
        _float(0), 30.0, "on SIGTERM/Ctrl-C: seconds the items in flight may take to finish"
    ),
    "window": Option(
        _optional(_window), None, "hours the worker may run, local time: 22:00-07:00[,…]"
    ),
    "yield_gpu": Option(
        _bool, False, "step aside (unload) while another process starts using the GPU"
    ),
    "yield_gpu_min": Option(
        _bytes, 512 * 2**20, "with yield_gpu: VRAM a new process must use to count (bytes)"
    ),
    "yield_gpu_quiet": Option(
        _float(0), 120.0, "with yield_gpu: seconds the card must be free before resuming"
    ),
    "wake_on_notify": Option(
        _bool, True, "PostgreSQL: idle workers wake the moment work is queued (LISTEN/NOTIFY)"
    ),
    "max_model_wait": Option(
        _float(0), 7200.0, "seconds a job of another model waits before it beats the loaded one"
    ),
    "log_format": Option(_choice("plain", "json"), "plain", "log lines: plain or json"),
    "max_tokens": Option(_param("max_tokens"), 256, "default completion length per prompt"),
    "max_line_bytes": Option(
        _int(1024), 4 * 2**20, "longest input line read (bytes); longer ones are line errors"
    ),
    "temperature": Option(_param("temperature"), 0.0, "default sampling temperature (0 = greedy)"),
    "top_p": Option(_param("top_p"), 1.0, "default nucleus sampling threshold"),
    "seed": Option(_param("seed"), 0, "default sampling seed (same seed, same text)"),
}


@dataclass(frozen=True)
class Settings:
    """The effective settings and, per key, where each value came from."""

    db: str
    model: str | None
    models: dict[str, str]
    engine: str
    ctx: int | str
    gpu_layers: int | str
    gpu: int
    vram_cap: str | None
    parallel: int | str
    flash_attn: str
    cache_type: str
    n_batch: int
    n_ubatch: int | str
    swa_full: str
    placement: str
    allow_swap: bool
    allow_cpu: bool
    backoff_seconds: float
    shrink_step: float
    shrink_parallel_first: bool
    threads: int | str
    batch_size: int | None
    lease_seconds: int
    poll_seconds: float
    max_attempts: int
    stall_seconds: float
    progress_seconds: float
    stop_timeout: float
    window: str | None
    yield_gpu: bool
    yield_gpu_min: int
    yield_gpu_quiet: float
    max_model_wait: float
    wake_on_notify: bool
    log_format: str
    max_tokens: int
    max_line_bytes: int
    temperature: float
    top_p: float
    seed: int
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    config_file: Path | None = None

    @property
    def db_url(self) -> str:
        """The database as a SQLAlchemy URL (a bare path means a SQLite file)."""
        if "://" in self.db:
            return self.db
        return f"sqlite:///{Path(self.db).expanduser().resolve()}"

    def generation_defaults(self) -> dict[str, Any]:
        """The job-level generation parameters that submit records."""
        return {k: getattr(self, k) for k in JOB_PARAMS}

    def overridden(self, values: Mapping[str, Any], origin: str) -> Settings:
        """These settings with `values` (checked as any setting is) from `origin`, e.g. a
        job's own load settings from "job 3"."""
        parsed = {k: _parse(k, v, f"{origin}: {k}") for k, v in values.items()}
        return replace(self, **parsed, sources={**self.sources, **dict.fromkeys(parsed, origin)})

    def as_dict(self) -> dict[str, Any]:
        """Every setting by name (without the provenance)."""
        return {k: getattr(self, k) for k in OPTIONS}

    def shown(self) -> dict[str, Any]:
        """as_dict with secrets masked (a database URL's password), for printing."""
        values = self.as_dict()
        values["db"] = mask_url(values["db"])
        return values


def _config_path(explicit: str | None, env: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The config file to read and whether it must exist (it must if it was named)."""
    if explicit:
        return Path(explicit).expanduser(), True
    if env.get("EXECUTOR_CONFIG"):
        return Path(env["EXECUTOR_CONFIG"]).expanduser(), True
    default = xdg_dir("config") / "config.yaml"
    return default, False


def _read_file(path: Path) -> dict[str, Any]:
    data = load_yaml(read_text(path, "config file"), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def undecodable(value: Any) -> bool:
    """Text (or a list of texts) holding bytes the locale could not decode: a Latin-1 file
    name, a stray byte in a variable. Python keeps them as lone surrogates, which nothing can
    store or print."""
    values = value if isinstance(value, list | tuple) else [value]
    for text in values:
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def not_utf8(where: str) -> ConfigError:
    return ConfigError(
        f"{where}: not valid UTF-8 text (a byte of another encoding)",
        hint="executor keeps settings and paths as UTF-8: rename the file or write the value "
        "in UTF-8",
    )


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults, the config file, EXECUTOR_* variables and flags; validate every value."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, option in OPTIONS.items():
        values[key], sources[key] = option.default, "default"

    path, required = _config_path(config, env)
    used_file = None
    if path is not None and (path.exists() or path.is_symlink()):
        used_file = path
        for key, raw in _read_file(path).items():
            if key not in OPTIONS:
                raise ConfigError(
                    f"{path}: unknown setting {key!r}",
                    hint=f"known settings: {', '.join(OPTIONS)}",
                )
            values[key] = _parse(key, raw, f"{path}: {key}")
            sources[key] = f"file {path}"
    elif required:
        raise ConfigError(f"config file {path} does not exist")

    for key in OPTIONS:
        name = f"EXECUTOR_{key.upper()}"
        if name in env:
            values[key] = _parse(key, env[name], name)
            sources[key] = f"env {name}"

    for key, raw in flags.items():
        if key not in OPTIONS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _parse(key, raw, FLAG_NAMES.get(key, f"--{key.replace('_', '-')}"))
        sources[key] = "flag"

    if values["db"] is None:
        values["db"] = str(xdg_dir("data") / "executor.db")
    remember(values["db"])  # its password is masked in everything printed from now on
    return Settings(**values, sources=sources, config_file=used_file)


def _parse(key: str, raw: Any, where: str) -> Any:
    if undecodable(raw):
        raise not_utf8(where)
    try:
        return OPTIONS[key].parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None

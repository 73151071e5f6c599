"""Job specs: a YAML file that says what to run, on which model, how, and where results go.

name: nightly-summaries
input: ../examples/prompts.jsonl     # paths are relative to the spec file
model: smollm2                        # a GGUF path or a name from `models:` in the config
vram_cap: 11.5GiB
ctx: 4096
parallel: auto
max_tokens: 256
temperature: 0
output: ../out/nightly.jsonl
format: openai                        # or executor (the default)
errors: ../out/nightly.errors.jsonl   # openai format: failed requests go here
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.config import OPTIONS, Settings, load_settings
from executor.errors import ConfigError
from executor.jobs.export import FORMATS
from executor.params import JOB_PARAMS
from executor.paths import (
    JSONError,
    check_writable,
    load_yaml,
    parse_json,
    read_text,
    same_file,
)
from executor.planning.job_settings import LOAD_KEYS
from executor.units import parse_size
from executor.windows import Window

SPEC_KEYS = (
    "min_vram",
    "priority",
    "window",
    "name",
    "input",
    "model",
    "json_schema",
    "output",
    "format",
    "errors",
    "with_provenance",
    "include_failed",
    *JOB_PARAMS,
    *LOAD_KEYS,
)


@dataclass(frozen=True)
class JobSpec:
    path: Path
    name: str
    input: Path
    model: str | None
    settings: dict[str, Any]  # generation and load settings, as flags would give them
    json_schema: dict[str, Any] | None
    output: Path | None
    format: str
    errors: Path | None
    with_provenance: bool
    include_failed: bool
    min_vram: int | None = None  # only workers with a GPU this large take the job
    priority: int = 0  # higher runs first
    window: str | None = None  # the hours it may run in, local time

    @property
    def load(self) -> dict[str, Any]:
        """The settings that shape the model's load; stored with the job for any worker."""
        return {k: self.settings[k] for k in LOAD_KEYS if k in self.settings}


def spec_settings(spec: JobSpec, flags: dict[str, Any], config: str | None = None) -> Settings:
    """Settings for a spec's job: the command's flags win over the spec, which wins over the
    environment and the config file."""
    merged: dict[str, Any] = dict(spec.settings)
    if spec.model:
        merged["model"] = spec.model
    merged.update({k: v for k, v in flags.items() if v is not None})
    return load_settings(merged, config=config)


def is_spec(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def read_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec; errors name the file and the key."""
    path = Path(path)
    data = load_yaml(read_text(path, "job spec"), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job spec is a mapping of keys (name, input, model, ...)")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}", hint=f"job spec keys: {', '.join(SPEC_KEYS)}"
        )
    base = path.parent

    def where(key: str) -> str:
        return f"{path}: {key}"

    if "input" not in data:
        raise ConfigError(f"{path}: input is required (the prompt file to run)")
    settings: dict[str, Any] = {}
    for key in (*JOB_PARAMS, *LOAD_KEYS):
        if key in data:
            try:
                settings[key] = OPTIONS[key].parse(data[key])
            except ValueError as exc:
                raise ConfigError(f"{where(key)}: {exc}") from None
    fmt = str(data.get("format", "executor"))
    if fmt not in FORMATS:
        raise ConfigError(f"{where('format')}: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if "errors" in data and fmt != "openai":
        raise ConfigError(
            f"{where('errors')}: only with format: openai (our own format "
            "keeps failed items in the output with include_failed)"
        )
    for key in ("with_provenance", "include_failed"):
        if key in data and not isinstance(data[key], bool):
            raise ConfigError(f"{where(key)}: expected true or false, got {data[key]!r}")
    output = _path(base, data["output"], where("output")) if "output" in data else None
    errors = _path(base, data["errors"], where("errors")) if "errors" in data else None
    for target, key in ((output, "output"), (errors, "errors")):
        if target is not None:
            check_writable(target, where(key))
    if output is not None and output == errors:
        raise ConfigError(f"{path}: output and errors name the same file; give two")
    source = _path(base, data["input"], where("input"))
    for target, key in ((output, "output"), (errors, "errors")):
        if target is not None and same_file(str(target), str(source)):
            raise ConfigError(
                f"{where(key)}: {target} is the job's input file: writing the results there "
                "would destroy the prompts",
                hint="give the results a file of their own",
            )
    return JobSpec(
        path=path,
        name=_text(data.get("name", path.stem), where("name")),
        input=source,
        model=_text(data["model"], where("model")) if "model" in data else None,
        settings=settings,
        json_schema=read_schema(base, data.get("json_schema"), where("json_schema")),
        output=output,
        format=fmt,
        errors=errors,
        with_provenance=bool(data.get("with_provenance", False)),
        include_failed=bool(data.get("include_failed", False)),
        min_vram=_size(data["min_vram"], where("min_vram")) if "min_vram" in data else None,
        priority=_priority(data.get("priority", 0), where("priority")),
        window=_window(data["window"], where("window")) if "window" in data else None,
    )


def _priority(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _window(value: Any, where: str) -> str:
    try:
        return Window.parse(str(value)).text
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _size(value: Any, where: str) -> int:
    try:
        return parse_size(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _path(base: Path, value: Any, where: str) -> Path:
    return (base / Path(_text(value, where)).expanduser()).resolve()


def read_schema(base: Path, value: Any, where: str) -> dict[str, Any] | None:
    """Inline (a mapping) or a path to a .json file."""
    if value is None or isinstance(value, dict):
        return value
    schema_path = _path(base, value, where)
    try:
        schema = parse_json(read_text(schema_path, f"{where}: schema file"))
    except JSONError as exc:
        raise ConfigError(f"{where}: {schema_path}: {exc}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}: a JSON schema is an object")
    return schema

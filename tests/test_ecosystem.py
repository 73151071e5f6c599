"""Fitting in: OpenAI batch files in and out, structured output, job specs, config, doctor,
systemd units."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from executor.config import xdg_dir
from executor.errors import UsageError
from executor.jobs.jobspec import read_spec
from tests.helpers import ROOT, query, read_jsonl, run_cli, write_jsonl

VLLM_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"

# The fields of OpenAI's batch output format (https://platform.openai.com/docs/api-reference/batch)
OUTPUT_LINE = {
    "type": "object",
    "required": ["id", "custom_id", "response", "error"],
    "properties": {
        "id": {"type": "string"},
        "custom_id": {"type": "string"},
        "error": {"type": "null"},
        "response": {
            "type": "object",
            "required": ["status_code", "request_id", "body"],
            "properties": {
                "status_code": {"const": 200},
                "request_id": {"type": "string"},
                "body": {
                    "type": "object",
                    "required": ["id", "object", "created", "model", "choices", "usage"],
                    "properties": {
                        "object": {"enum": ["chat.completion", "text_completion"]},
                        "created": {"type": "integer"},
                        "choices": {"type": "array", "minItems": 1},
                        "usage": {
                            "type": "object",
                            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                        },
                    },
                },
            },
        },
    },
}
# OpenAI's BatchRequestOutput in the error file: a request answered with an error has a
# response with its status code and an error body; one never run (the batch was cancelled,
# or expired) has only `error`.
ERROR_LINE = {
    "type": "object",
    "required": ["id", "custom_id", "response", "error"],
    "oneOf": [
        {
            "properties": {
                "response": {
                    "type": "object",
                    "required": ["status_code", "request_id", "body"],
                    "properties": {
                        "status_code": {"enum": [400, 500]},
                        "body": {
                            "type": "object",
                            "required": ["error"],
                            "properties": {
                                "error": {
                                    "type": "object",
                                    "required": ["message", "type", "param", "code"],
                                }
                            },
                        },
                    },
                },
                "error": {"type": "null"},
            }
        },
        {
            "properties": {
                "response": {"type": "null"},
                "error": {"type": "object", "required": ["code", "message"]},
            }
        },
    ],
}


def write_config(data: dict) -> Path:
    path = xdg_dir("config") / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def openai_line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def export_openai(tmp_path: Path, db_path: Path, job: str) -> tuple[list[dict], Path]:
    """`export --format openai -o out --errors err`: the output lines and the error file."""
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    run_cli(
        "export", job, "--format", "openai", "-o", str(out), "--errors", str(errors),
        db_path=db_path, check=True,
    )  # fmt: skip
    return read_jsonl(out), errors


# --- OpenAI batch files --------------------------------------------------------------------------


@pytest.mark.model
def test_vllm_example_batch_runs_unchanged_with_an_alias(tmp_path, db_path, default_model):
    write_config({"models": {VLLM_MODEL: str(default_model)}})
    source = ROOT / "examples" / "openai_batch.jsonl"
    job = run_cli("submit", str(source), db_path=db_path, check=True).stdout.strip()
    assert query(db_path, "SELECT model FROM jobs") == [(str(default_model),)]
    run_cli("run", "--until-empty", db_path=db_path, check=True)
    lines, errors = export_openai(tmp_path, db_path, job)
    assert [line["custom_id"] for line in lines] == ["request-1", "request-2"]
    for line in lines:
        jsonschema.validate(line, OUTPUT_LINE)
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == VLLM_MODEL
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"]
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert errors.read_text() == ""


def test_completions_url_and_error_file(tmp_path, db_path, tiny_model):
    write_config({"models": {"tiny": str(tiny_model)}})
    rows = [
        openai_line(
            "a",
            {"model": "tiny", "prompt": "one two three", "max_tokens": 2},
            url="/v1/completions",
        ),
        openai_line("b", {"model": "tiny", "messages": [{"role": "user", "content": "x " * 300}]}),
    ]
    job = run_cli(
        "submit", str(write_jsonl(tmp_path / "in.jsonl", rows)), db_path=db_path, check=True
    ).stdout.strip()
    run_cli(
        "run",
        "--until-empty",
        "--ctx",
        "64",
        db_path=db_path,
        env={"EXECUTOR_ENGINE": "fake"},
        check=True,
    )
    (ok,), errors = export_openai(tmp_path, db_path, job)
    jsonschema.validate(ok, OUTPUT_LINE)
    body = ok["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "echo: one"
    assert body["choices"][0]["finish_reason"] == "length"
    (failed,) = read_jsonl(errors)
    jsonschema.validate(failed, ERROR_LINE)
    error = failed["response"]["body"]["error"]
    assert failed["custom_id"] == "b" and "the context holds 64" in error["message"]
    assert failed["response"]["status_code"] == 400 and error["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            openai_line("a", {"model": "nobody", "messages": [{"role": "user", "content": "x"}]}),
            "unknown model 'nobody': map it to a GGUF file in the config file",
        ),
        (
            openai_line("a", {"model": "tiny", "input": "x"}, url="/v1/embeddings"),
            "unsupported url '/v1/embeddings'",
        ),
        (
            openai_line(
                "a", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}
            ),
            "body.n = 3: one completion per request is supported",
        ),
        (
            openai_line(
                "a",
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "xml"},
                },
            ),
            "response_format.type must be text, json_object or json_schema",
        ),
        (
            openai_line(
                "a", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": []}
            ),
            "body.tools is not supported",
        ),
        (
            {"method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny"}},
            "OpenAI batch lines need a custom_id",
        ),
        (openai_line("a", {"model": "tiny", "prompt": "x"}), "body.messages is required"),
    ],
)
def test_openai_line_errors_are_per_line(tmp_path, db_path, tiny_model, row, reason):
    write_config({"models": {"tiny": str(tiny_model)}})
    good = openai_line("ok", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    path = write_jsonl(tmp_path / "in.jsonl", [good, row])
    result = run_cli("submit", str(path), db_path=db_path)
    assert result.returncode == 2, result.stderr
    assert f"{path}:2: " in result.stderr and reason in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_naming_two_models_is_refused(tmp_path, db_path, tiny_model):
    other = shutil.copy(tiny_model, tmp_path / "other.gguf")
    write_config({"models": {"a": str(tiny_model), "b": str(other)}})
    rows = [
        openai_line("1", {"model": "a", "prompt": "x"}, url="/v1/completions"),
        openai_line("2", {"model": "b", "prompt": "y"}, url="/v1/completions"),
    ]
    result = run_cli("submit", str(write_jsonl(tmp_path / "in.jsonl", rows)), db_path=db_path)
    assert result.returncode == 2 and "name 2 models" in result.stderr


def test_model_flag_serves_every_openai_line(tmp_path, db_path, tiny_model):
    rows = [openai_line("1", {"model": "whatever", "prompt": "x"}, url="/v1/completions")]
    run_cli(
        "submit",
        str(write_jsonl(tmp_path / "in.jsonl", rows)),
        "--model",
        str(tiny_model),
        db_path=db_path,
        check=True,
    )
    assert query(db_path, "SELECT model FROM jobs") == [(str(tiny_model),)]


# --- structured output ---------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.model
def test_json_schema_constrains_outputs(tmp_path, db_path, default_model):
    write_config({"models": {"smol": str(default_model)}})
    rows = [
        {
            "custom_id": "line-schema",
            "json_schema": PERSON,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Invent a person. Answer in JSON."}],
        },
        openai_line(
            "openai-schema",
            {
                "model": "smol",
                "max_completion_tokens": 200,
                "messages": [{"role": "user", "content": "Give me a city and its country."}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "city",
                        "schema": {
                            "type": "object",
                            "properties": {
                                "city": {"type": "string"},
                                "country": {"type": "string"},
                            },
                            "required": ["city", "country"],
                        },
                    },
                },
            },
        ),
        openai_line(
            "json-object",
            {
                "model": "smol",
                "max_tokens": 100,
                "response_format": {"type": "json_object"},
                "messages": [
                    {
                        "role": "user",
                        "content": "Return JSON with the key answer: "
                        "what is the capital of France?",
                    }
                ],
            },
        ),
        # A valid schema the converter cannot make a grammar of (it wants ^…$ patterns).
        {
            "custom_id": "bad-schema",
            "json_schema": {"type": "string", "pattern": "a+"},
            "prompt": "x",
        },
    ]
    path = write_jsonl(tmp_path / "in.jsonl", [rows[0], rows[3]])
    job1 = run_cli("submit", str(path), db_path=db_path, check=True).stdout.strip()
    path2 = write_jsonl(tmp_path / "in2.jsonl", rows[1:3])
    job2 = run_cli("submit", str(path2), db_path=db_path, check=True).stdout.strip()
    run_cli("run", "--until-empty", db_path=db_path, check=True)
    out = {
        r["custom_id"]: r
        for r in read_jsonl(
            run_cli("export", job1, "--include-failed", db_path=db_path, check=True).stdout
        )
    }
    jsonschema.validate(json.loads(out["line-schema"]["output"]), PERSON)
    assert out["bad-schema"]["status"] == "failed"
    assert out["bad-schema"]["error"].startswith("json_schema cannot be turned into a grammar")
    for line in read_jsonl(
        run_cli("export", job2, "--format", "openai", db_path=db_path, check=True).stdout
    ):
        # Complete JSON unless cut by max_tokens, which the finish reason would say.
        assert line["response"]["body"]["choices"][0]["finish_reason"] == "stop"
        content = json.loads(line["response"]["body"]["choices"][0]["message"]["content"])
        assert isinstance(content, dict)
        if line["custom_id"] == "openai-schema":
            assert {"city", "country"} <= set(content)


# --- job specs -----------------------------------------------------------------------------------


def spec_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "specs" / "job.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_job_end_to_end(tmp_path, db_path, tiny_model):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"item {i}"} for i in range(5)])
    spec = spec_file(
        tmp_path,
        {
            "name": "nightly",
            "input": "../prompts.jsonl",
            "model": str(tiny_model),
            "ctx": 512,
            "parallel": 2,
            "max_tokens": 8,
            "output": "../out/results.jsonl",
            "with_provenance": True,
        },
    )
    env = {"EXECUTOR_ENGINE": "fake"}
    first = run_cli("run-job", str(spec), "--json", db_path=db_path, env=env, check=True)
    assert json.loads(first.stdout)["status"] == "done"
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["output"] for r in rows] == [f"echo: item {i}" for i in range(5)]
    load = rows[0]["provenance"]["load"]
    assert (load["n_ctx"], load["parallel"]) == (512, 2)
    assert rows[0]["provenance"]["params"]["max_tokens"] == 8
    # Again: the same job, nothing new to run, the same output.
    again = run_cli("run-job", str(spec), db_path=db_path, env=env, check=True)
    assert "submitted before; finishing it" in again.stderr
    assert query(db_path, "SELECT count(*) FROM jobs") == [(1,)]


def test_run_job_exit_code_when_the_job_fails(tmp_path, db_path, tiny_model):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "x"}])
    spec = spec_file(tmp_path, {"input": "../prompts.jsonl", "model": str(tiny_model)})
    env = {
        "EXECUTOR_ENGINE": "fake",
        "EXECUTOR_FAULT_OOM_LOAD_ABOVE": "-1",
        "EXECUTOR_BACKOFF_SECONDS": "0",
        "EXECUTOR_PARALLEL": "1",
    }
    result = run_cli("run-job", str(spec), db_path=db_path, env=env)
    assert result.returncode == 6 and "failed: model" in result.stderr


def test_submit_accepts_a_spec(tmp_path, db_path, tiny_model):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    spec = spec_file(
        tmp_path,
        {
            "name": "from-spec",
            "input": "../prompts.jsonl",
            "model": str(tiny_model),
            "vram_cap": "8GiB",
            "json_schema": {"type": "object"},
        },
    )
    run_cli("submit", str(spec), db_path=db_path, check=True)
    ((name, params),) = query(db_path, "SELECT name, params FROM jobs")
    params = json.loads(params)
    assert name == "from-spec" and params["load"] == {"vram_cap": "8GiB"}
    assert params["json_schema"] == {"type": "object"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"input": "x.jsonl", "colour": "blue"}, "unknown key 'colour'"),
        ({"model": "m"}, "input is required"),
        ({"input": "x.jsonl", "ctx": "wide"}, "ctx: expected an integer, got 'wide'"),
        ({"input": "x.jsonl", "vram_cap": "12G"}, "vram_cap: not a size: '12G'"),
        ({"input": "x.jsonl", "format": "csv"}, "format: must be one of executor, openai"),
        ({"input": "x.jsonl", "errors": "e.jsonl"}, "errors: only with format: openai"),
        ({"input": "x.jsonl", "json_schema": "missing.json"}, "json_schema:"),
    ],
)
def test_spec_errors_name_the_file_and_key(tmp_path, data, message):
    path = spec_file(tmp_path, data)
    with pytest.raises(UsageError, match=str(path).replace(".", r"\.")) as caught:
        read_spec(path)
    assert message in str(caught.value)


def test_shipped_specs_are_valid():
    for spec in sorted((ROOT / "jobs").glob("*.yaml")):
        parsed = read_spec(spec)
        assert parsed.input.exists(), spec


# --- config, doctor, units -----------------------------------------------------------------------


def test_config_show_says_where_each_value_comes_from(db_path):
    path = write_config({"ctx": 1024, "batch_size": 8, "models": {"m": "/x.gguf"}})
    result = run_cli(
        "config", "show", "--json", db_path=db_path, env={"EXECUTOR_BATCH_SIZE": "32"}, check=True
    )
    data = json.loads(result.stdout)
    assert data["config_file"] == str(path)
    settings = data["settings"]
    assert settings["ctx"] == {"value": 1024, "source": f"file {path}"}
    assert settings["batch_size"] == {"value": 32, "source": "env EXECUTOR_BATCH_SIZE"}
    assert settings["db"]["source"] == "env EXECUTOR_DB"
    assert settings["models"]["value"] == {"m": "/x.gguf"}
    assert settings["temperature"] == {"value": 0.0, "source": "default"}


def test_unknown_config_key_is_an_error_naming_it(db_path):
    path = write_config({"vram_capp": "8GiB"})
    result = run_cli("config", "show", db_path=db_path)
    assert result.returncode == 2 and f"{path}: unknown setting 'vram_capp'" in result.stderr


def test_doctor_without_a_gpu_warns_and_passes(db_path, default_model):
    result = run_cli("doctor", "--json", db_path=db_path)
    assert result.returncode == 0, result.stdout
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["GPU"]["state"] == "WARN"
    # A CPU-only build without a GPU loses nothing: a WARN that says how to build for one.
    assert checks["llama-cpp-python"]["state"] == "WARN"
    assert "make setup GPU=cuda" in checks["llama-cpp-python"]["hint"]
    for name in ("python", "memory", "database", "default model"):
        assert checks[name]["state"] == "OK", checks[name]
    assert "sha256 verified" in checks["default model"]["detail"]


def test_doctor_fails_on_a_missing_model(db_path, tmp_path):
    result = run_cli("doctor", db_path=db_path, env={"EXECUTOR_MODEL": str(tmp_path / "gone.gguf")})
    assert result.returncode == 9
    assert "FAIL  configured model" in result.stdout


def test_doctor_with_a_gpu_but_a_cpu_build(db_path):
    nvml = json.dumps([{"name": "NVIDIA RTX 4090", "total": 24 * 2**30}])
    result = run_cli("doctor", "--json", db_path=db_path, env={"EXECUTOR_FAKE_NVML": nvml})
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["GPU"]["state"] == "OK" and "NVIDIA RTX 4090" in checks["GPU"]["detail"]
    # The card would sit idle: a FAIL (exit 9) with the command that fixes it.
    assert result.returncode == 9
    assert checks["llama-cpp-python"]["state"] == "FAIL"
    assert "sits idle" in checks["llama-cpp-python"]["detail"]
    assert "make setup GPU=cuda" in checks["llama-cpp-python"]["hint"]


def test_systemd_units(tmp_path):
    """systemd-analyze verify when it is installed; the keys that matter in any case."""
    units = {}
    tmp_path = tmp_path / "units"
    tmp_path.mkdir()
    for unit in sorted((ROOT / "examples" / "systemd").iterdir()):
        text = unit.read_text()
        sections: dict[str, dict[str, str]] = {}
        current = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), {})
            else:
                key, _, value = line.partition("=")
                assert current is not None, unit
                current[key] = value
        units[unit.name] = sections
        # A copy whose ExecStart exists here, for systemd-analyze.
        local = text.replace(
            "/opt/executor/.venv/bin/executor",
            str(Path(shutil.which("executor") or ROOT / ".venv/bin/executor")),
        )
        (tmp_path / unit.name).write_text(local.replace("User=executor", "User=root"))
    worker = units["executor-worker.service"]["Service"]
    assert worker["ExecStart"].endswith("executor run")
    assert worker["KillSignal"] == "SIGTERM" and worker["Restart"] == "on-failure"
    assert worker["StandardError"] == "journal" and worker["KillMode"] == "mixed"
    drain = units["executor-drain.service"]["Service"]
    assert drain["Type"] == "oneshot" and drain["ExecStart"].endswith("run --until-empty")
    assert units["executor-drain.timer"]["Timer"]["Unit"] == "executor-drain.service"
    serve = units["executor-serve.service"]["Service"]
    assert "executor serve --host 127.0.0.1" in serve["ExecStart"]
    assert "EXECUTOR_API_KEY" not in serve.get("Environment", "")
    cron = (ROOT / "examples" / "crontab").read_text()
    assert "executor run-job jobs/nightly.yaml" in cron
    analyze = shutil.which("systemd-analyze")
    if analyze:
        result = subprocess.run(
            [analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr

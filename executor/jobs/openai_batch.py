"""The OpenAI Batch API file formats: request lines in, response and error lines out.

Input lines (as OpenAI's batch service and vLLM's run-batch take them):
  {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"model": "...", "messages": [...], "max_completion_tokens": 1000}}
and "/v1/completions" with "prompt". Output lines:
  {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
with a `chat.completion` or `text_completion` body including `usage`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from executor.jobs import fields
from executor.jobs.fields import LineError, ModelResolver, RequestError
from executor.outcomes import CLIENT_FAULTS, FailCode

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
LINE_KEYS = {"custom_id", "method", "url", "body"}
BODY_KEYS = {
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "response_format",
}
# Accepted and ignored: they do not change what is generated.
IGNORED_BODY_KEYS = {"user", "metadata", "store", "service_tier", "stream", "stream_options"}


def parse_openai_line(
    data: dict[str, Any], model_for: ModelResolver | None
) -> tuple[dict[str, Any], str | None]:
    """Validate an OpenAI batch line; return our stored request and the GGUF its model maps to.

    A bad envelope (custom_id, method, url, a body that is not an object) is a LineError,
    which fails a whole batch as OpenAI fails it; anything wrong inside the body is a
    RequestError, which OpenAI answers for that request alone."""
    body, url = _envelope(data)
    try:
        return _request(body, url, model_for)
    except RequestError:
        raise
    except LineError as exc:
        raise RequestError(str(exc)) from None


def _envelope(data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    unknown = sorted(set(data) - LINE_KEYS)
    if unknown:
        raise LineError(
            f"unknown key {unknown[0]!r} in an OpenAI batch line "
            f"(allowed: {', '.join(sorted(LINE_KEYS))})"
        )
    if "custom_id" not in data:
        raise LineError("OpenAI batch lines need a custom_id")
    fields.check_custom_id(data["custom_id"])
    if data.get("method", "POST") != "POST":
        raise LineError(f"method must be POST, got {data.get('method')!r}")
    url = data.get("url")
    if url not in URLS:
        raise LineError(f"unsupported url {url!r} (supported: {', '.join(URLS)})")
    body = data.get("body")
    if not isinstance(body, dict):
        raise LineError(f"body must be an object, got {fields.kind_of(body)}")
    return body, url


def _request(
    body: dict[str, Any], url: str, model_for: ModelResolver | None
) -> tuple[dict[str, Any], str | None]:
    unknown = sorted(set(body) - BODY_KEYS - IGNORED_BODY_KEYS)
    if unknown:
        raise LineError(f"body.{unknown[0]} is not supported")
    if body.get("stream") is True:
        raise LineError("body.stream: streaming makes no sense in a batch; remove it")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise LineError("body.model must name a model")
    model = model_for(name) if model_for else None
    n = body.get("n", 1)
    if n != 1:
        raise LineError(f"body.n = {n!r}: one completion per request is supported (n = 1)")

    request: dict[str, Any] = {"model_name": name}
    if URLS[url] == "chat":
        if "messages" not in body:
            raise LineError("body.messages is required for /v1/chat/completions")
        if "prompt" in body:
            raise LineError("body.prompt does not belong in /v1/chat/completions")
        request["messages"] = fields.parse_messages(body["messages"])
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise LineError("body.prompt must be a non-empty string for /v1/completions")
        request["prompt"] = prompt
    given = {k: body[k] for k in ("temperature", "top_p", "seed", "stop") if k in body}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        given["max_tokens"] = limit
    params = fields.parse_params(given)
    if params:
        request["params"] = params
    schema = _response_format(body.get("response_format"))
    if schema is not None:
        request["json_schema"] = schema
    return request, model


def _response_format(value: Any) -> dict[str, Any] | None:
    """{"type": "text"} → None; "json_object" → any object; "json_schema" → its schema."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise LineError("body.response_format.type must be text, json_object or json_schema")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return {"type": "object"}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise LineError("body.response_format.json_schema needs a schema")
    return fields.json_schema(spec["schema"])


# --- output --------------------------------------------------------------------------------------


def response_line(row: Any, job_id: int, created: int | None = None) -> dict[str, Any]:
    """A batch output line for a finished item (`row` as results.export_rows gives it)."""
    request = row["request"] or {}
    request_id = _request_id(job_id, row["custom_id"])
    model = request.get("model_name") or "executor"
    usage = {
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
    }
    created = created or int(time.time())
    if "messages" in request:
        body = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": row["output"]},
                    "logprobs": None,
                    "finish_reason": row["finish_reason"],
                }
            ],
            "usage": usage,
        }
    else:
        body = {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": row["output"],
                    "logprobs": None,
                    "finish_reason": row["finish_reason"],
                }
            ],
            "usage": usage,
        }
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": row["custom_id"],
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(row: Any, job_id: int) -> dict[str, Any]:
    """A batch error line for a failed, invalid or cancelled item, as OpenAI writes them: a
    request that was answered with an error has a response with the status code and an
    error body (400: the request's own fault; 500: ours); one that never ran because the
    batch was cancelled has only `error`."""
    request_id = _request_id(job_id, row["custom_id"])
    line: dict[str, Any] = {"id": f"batch_req_{request_id}", "custom_id": row["custom_id"]}
    status = str(row["status"])
    if status == "cancelled":
        message = "This request was not run because the batch was cancelled."
        return {**line, "response": None, "error": {"code": "batch_cancelled", "message": message}}
    default = FailCode.INVALID_REQUEST if status == "invalid" else FailCode.FAILED
    code = FailCode(row["error_code"]) if row["error_code"] else default
    client = code in CLIENT_FAULTS
    error = {
        "message": row["error"] or status,
        "type": "invalid_request_error" if client else "server_error",
        "param": None,
        "code": code.value,
    }
    response = {"status_code": 400 if client else 500, "request_id": request_id,
                "body": {"error": error}}  # fmt: skip
    return {**line, "response": response, "error": None}


def _request_id(job_id: int, custom_id: str) -> str:
    return hashlib.sha256(f"{job_id}:{custom_id}".encode()).hexdigest()[:24]

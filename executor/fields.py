"""Validating the fields of one request, whichever file format carries it (ours or OpenAI's
batch lines): messages, generation parameters, schemas. Each problem is a LineError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from executor.records import INTEGER_PARAMS, PARAM_BOUNDS

ROLES = ("system", "user", "assistant")
PARAM_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "seed",
    "stop",
)


class LineError(ValueError):
    """What is wrong with one input line."""


ModelResolver = Callable[[str], str]  # a model name from a line → GGUF path; LineError if none


def check_custom_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise LineError(f"custom_id must be a non-empty string, got {kind_of(value)}")
    if len(value) > 512:
        raise LineError("custom_id is longer than 512 characters")
    return value


def json_schema(value: Any) -> dict[str, Any]:
    """A JSON schema (an object); whether llama.cpp can turn it into a grammar is checked
    when the item runs, and an item whose schema cannot be converted fails with the reason."""
    if not isinstance(value, dict):
        raise LineError(f"json_schema must be an object, got {kind_of(value)}")
    return value


def parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise LineError(f"messages must be a non-empty list, got {kind_of(value)}")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise LineError(f"{where} must be an object, got {kind_of(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise LineError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            content = _text_parts(content, where)
        if not isinstance(content, str):
            raise LineError(f"{where}.content must be a string, got {kind_of(content)}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] == "assistant":
        raise LineError("the last message is the assistant's; nothing to answer")
    return messages


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for part in parts:
        if not (
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ):
            raise LineError(f"{where}.content: only text parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def parse_params(data: dict[str, Any]) -> dict[str, Any]:
    """The generation parameters present in `data`, type- and range-checked."""
    params: dict[str, Any] = {}
    for key in PARAM_KEYS:
        if key not in data:
            continue
        if key == "stop":
            params[key] = _stop(data[key])
        elif key in INTEGER_PARAMS:
            params[key] = _int(data[key], key, *PARAM_BOUNDS[key])
        else:
            params[key] = _number(data[key], key, *PARAM_BOUNDS[key])
    return params


def _int(value: Any, key: str, low: float, high: float | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LineError(f"{key} must be an integer, got {kind_of(value)}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise LineError(f"{key} must be {bounds}, got {value}")
    return value


def _number(value: Any, key: str, low: float, high: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LineError(f"{key} must be a number, got {kind_of(value)}")
    if not low <= value <= (high if high is not None else value):
        raise LineError(f"{key} must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise LineError("stop must be a non-empty string or a list of non-empty strings")
    return stops


def kind_of(value: Any) -> str:
    """A JSON-ish name for a value's type, for messages."""
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)

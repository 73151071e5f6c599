"""Validating the fields of one request, whichever file format carries it (ours or OpenAI's
batch lines): messages, generation parameters, schemas. Each problem is a LineError."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from executor.params import INTEGER_PARAMS, PARAM_BOUNDS
from executor.schemas import unsatisfiable

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


class RequestError(LineError):
    """What is wrong with the request an OpenAI batch line carries (not with the line):
    OpenAI answers such a request alone, with a 400 in the error file, and runs the rest."""


ModelResolver = Callable[[str], str]  # a model name from a line → GGUF path; LineError if none


def check_custom_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise LineError(f"custom_id must be a non-empty string, got {kind_of(value)}")
    if len(value) > 512:
        raise LineError("custom_id is longer than 512 characters")
    return value


def json_schema(value: Any) -> dict[str, Any]:
    """A JSON schema (an object) that some output can meet (schemas.py says what is seen
    before generating); whether llama.cpp can turn it into a grammar is checked when the
    item runs, and an item whose schema cannot be converted fails with the reason."""
    if not isinstance(value, dict):
        raise LineError(f"json_schema must be an object, got {kind_of(value)}")
    problem = unsatisfiable(value)
    if problem:
        joint = "" if problem.startswith((".", "[", " ")) else " "
        raise LineError(f"json_schema{joint}{problem}")
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


def check_strings(value: Any, where: str = "") -> None:
    """Every string in a parsed line must be storable and exportable: no NUL character
    (PostgreSQL text cannot hold it) and no lone UTF-16 surrogate (not Unicode: cut JavaScript
    strings produce them; they cannot be written as UTF-8)."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, sub in item.items():
                _check_text(key, path)
                stack.append((sub, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]") for i, sub in enumerate(item))


def _check_text(text: str, path: str) -> None:
    where = f" in {path}" if path else ""
    if "\x00" in text:
        raise LineError(f"a NUL character (\\u0000){where}: databases cannot store it")
    if _SURROGATE.search(text):
        bad = _SURROGATE.search(text)[0]  # type: ignore[index]
        raise LineError(
            f"a lone UTF-16 surrogate (\\u{ord(bad):04x}){where} is not valid Unicode "
            "(a string cut in the middle of an emoji?)"
        )


_SURROGATE = re.compile("[\ud800-\udfff]")
SCHEMA_LENGTHS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
                  "maxProperties", "minContains", "maxContains")  # fmt: skip
CHARS_PER_TOKEN = 64  # more than any tokenizer's longest piece: a generous ceiling


def bound_schema(schema: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """A JSON schema whose grammar can be built in bounded time for `max_tokens`: a minimum
    length or count no output of max_tokens tokens can reach is an error (llama.cpp's
    converter would spend minutes and gigabytes spelling it out); a maximum beyond it is
    dropped (it cannot bind)."""
    limit = max_tokens * CHARS_PER_TOKEN

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, list):
            return [walk(sub, f"{path}[{i}]") for i, sub in enumerate(node)]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in SCHEMA_LENGTHS and not isinstance(value, bool) and isinstance(value, int):
                if value < 0:
                    raise LineError(f"json_schema{path}.{key} is negative ({value})")
                if key.startswith("min") and value > limit:
                    raise LineError(
                        f"json_schema{path}.{key} = {value} cannot be met in {max_tokens} "
                        "tokens (raise max_tokens or lower it)"
                    )
                if key.startswith("max") and value > limit:
                    continue
            out[key] = walk(value, f"{path}.{key}")
        return out

    return walk(schema, "")

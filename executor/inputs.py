"""Reading prompt files line by line and validating each line, streaming (never the whole file)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from executor.errors import InputError
from executor.fields import (
    PARAM_KEYS,
    LineError,
    ModelResolver,
    check_custom_id,
    json_schema,
    kind_of,
    parse_messages,
    parse_params,
)
from executor.openai_batch import parse_openai_line

LINE_KEYS = ("prompt", "messages", "custom_id", "metadata", "json_schema", *PARAM_KEYS)
MAX_REPORTED = 20  # bad lines listed one by one; the rest are counted


@dataclass(frozen=True)
class Entry:
    """One non-blank input line: valid (`request` set) or not (`error` set)."""

    line: int
    custom_id: str
    request: dict[str, Any] | None = None
    error: str | None = None
    raw: str = ""
    model: str | None = None  # the GGUF an OpenAI batch line's body.model maps to


@dataclass
class Scan:
    """Totals of a full pass over the file."""

    sha256: str = ""
    valid: int = 0
    invalid: int = 0
    problems: list[str] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)  # model named by lines → first line


class PromptFile:
    """A prompt file (or stdin, spooled to disk so it can be read twice) to scan repeatedly."""

    def __init__(self, source: str, model_for: ModelResolver | None = None) -> None:
        self.source = source
        self.model_for = model_for
        self.display = "<stdin>" if source == "-" else source
        self._spool: IO[bytes] | None = None
        if source == "-":
            self._spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
            shutil.copyfileobj(sys.stdin.buffer, self._spool)
        elif not Path(source).is_file():
            raise InputError(f"{source}: no such file")

    @property
    def path_for_record(self) -> str:
        """What the job records as its input path."""
        return "-" if self._spool else str(Path(self.source).resolve())

    def _open(self) -> IO[bytes]:
        if self._spool is not None:
            self._spool.seek(0)
            return _Unclosable(self._spool)
        return open(self.source, "rb")

    def entries(self, digest: hashlib._Hash | None = None) -> Iterator[Entry]:
        """Every non-blank line, validated; `digest` is fed the raw bytes as they are read."""
        seen: dict[str, int] = {}
        with self._open() as stream:
            for number, raw in enumerate(stream, start=1):
                if digest is not None:
                    digest.update(raw)
                if not raw.strip():
                    continue
                yield _entry(raw, number, seen, self.model_for)

    def scan(self) -> Scan:
        """Validate every line and hash the content, keeping only counts and the first problems."""
        digest = hashlib.sha256()
        result = Scan()
        for entry in self.entries(digest):
            if entry.error is None:
                result.valid += 1
                if entry.model is not None:
                    result.models.setdefault(entry.model, entry.line)
            else:
                result.invalid += 1
                if len(result.problems) < MAX_REPORTED:
                    result.problems.append(f"{self.display}:{entry.line}: {entry.error}")
        result.sha256 = digest.hexdigest()
        if result.valid + result.invalid == 0:
            raise InputError(f"{self.display}: empty file: no prompts to run")
        return result

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


class _Unclosable:
    """Lets `with` wrap the spooled stdin without closing it between passes."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def __enter__(self) -> IO[bytes]:
        return self._stream

    def __exit__(self, *exc: object) -> None:
        return None


def _entry(raw: bytes, number: int, seen: dict[str, int], model_for: ModelResolver | None) -> Entry:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        return Entry(
            number,
            str(number),
            error=f"not UTF-8: byte 0x{bad} at column {exc.start + 1}",
            raw=raw.decode("utf-8", "replace"),
        )
    text = text.rstrip("\r\n")
    custom_id = str(number)
    try:
        data = _load_object(text)
        if "custom_id" in data:
            custom_id = check_custom_id(data["custom_id"])
        model = None
        if "body" in data or "url" in data:  # an OpenAI Batch API line
            request, model = parse_openai_line(data, model_for)
        else:
            request = parse_request(data)
        if custom_id in seen:
            raise LineError(f"duplicate custom_id {custom_id!r} (first on line {seen[custom_id]})")
    except LineError as exc:
        return Entry(number, custom_id, error=str(exc), raw=text)
    seen[custom_id] = number
    return Entry(number, custom_id, request=request, raw=text, model=model)


def _load_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise LineError(f"expected a JSON object, got {kind_of(data)}")
    return data


def parse_request(data: dict[str, Any]) -> dict[str, Any]:
    """Validate one line's object; return the stored request: prompt or messages, plus params."""
    unknown = sorted(set(data) - set(LINE_KEYS))
    if unknown:
        raise LineError(f"unknown key {unknown[0]!r} (allowed: {', '.join(LINE_KEYS)})")
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt == has_messages:
        raise LineError(
            "needs exactly one of 'prompt' or 'messages'"
            if not has_prompt
            else "has both 'prompt' and 'messages'; give one"
        )
    request: dict[str, Any] = {}
    if has_prompt:
        prompt = data["prompt"]
        if not isinstance(prompt, str):
            raise LineError(f"prompt must be a string, got {kind_of(prompt)}")
        if not prompt.strip():
            raise LineError("prompt is empty")
        request["prompt"] = prompt
    else:
        request["messages"] = parse_messages(data["messages"])
    params = parse_params(data)
    if params:
        request["params"] = params
    if "json_schema" in data:
        request["json_schema"] = json_schema(data["json_schema"])
    if "metadata" in data:
        if not isinstance(data["metadata"], dict):
            raise LineError(f"metadata must be an object, got {kind_of(data['metadata'])}")
        request["metadata"] = data["metadata"]
    return request


def format_problems(scan: Scan) -> list[str]:
    """The lines to print for a failed validation: the first problems, then a count."""
    lines = list(scan.problems)
    if scan.invalid > len(scan.problems):
        lines.append(f"... and {scan.invalid - len(scan.problems)} more invalid lines")
    return lines

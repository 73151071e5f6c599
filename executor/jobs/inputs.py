"""Reading prompt files line by line and validating each line, streaming (never the whole file)."""

from __future__ import annotations

import hashlib
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from executor.errors import InputError, UsageError
from executor.jobs.fields import (
    PARAM_KEYS,
    LineError,
    ModelResolver,
    RequestError,
    bound_schema,
    check_custom_id,
    check_strings,
    json_schema,
    kind_of,
    parse_messages,
    parse_params,
)
from executor.jobs.openai_batch import parse_openai_line
from executor.paths import JSONError, parse_json, regular_file

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
    refused: bool = False  # the line is sound but its request is not (fields.RequestError)


@dataclass
class Scan:
    """Totals of a full pass over the file."""

    sha256: str = ""
    valid: int = 0
    invalid: int = 0
    refused: int = 0  # requests refused one by one (only when the file asks for it)
    problems: list[str] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)  # model named by lines → first line


DEFAULT_MAX_LINE_BYTES = 4 * 2**20  # a 1M-token prompt is about 4 MB of text


class PromptFile:
    """A prompt file to scan twice (validate, then insert): a regular file is read in place;
    stdin, a pipe or a FIFO (`<(generate)`) is spooled to a temporary file first."""

    def __init__(
        self,
        source: str,
        model_for: ModelResolver | None = None,
        *,
        max_tokens: int = 256,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        display: str | None = None,
        refuse_requests: bool = False,
    ) -> None:
        self.source = source
        self.model_for = model_for
        self.max_tokens = max_tokens  # the job's default, for bounding JSON schemas
        self.max_line_bytes = max_line_bytes
        # How messages name the file (a server names an upload by its filename, not its path).
        self.display = display or ("<stdin>" if source == "-" else source)
        # OpenAI's way: a bad request is refused alone (an invalid item with its reason), a
        # bad line fails the file.
        self.refuse_requests = refuse_requests
        self._spool: IO[bytes] | None = None
        if source == "-":
            self._spool = _spool(sys.stdin.buffer, "<stdin>")
            return
        path = Path(source)
        try:
            mode = path.stat().st_mode
        except OSError:
            mode = None
        if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            try:
                with open(path, "rb") as stream:
                    self._spool = _spool(stream, source)
            except OSError as exc:
                raise InputError(f"{source}: cannot be read ({exc.strerror or exc})") from None
            return
        try:
            regular_file(path, "input file")
        except UsageError as exc:
            raise InputError(str(exc)) from None

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
        """Every non-blank line, validated; `digest` is fed the raw bytes as they are read.
        A line longer than max_line_bytes is an error of its own, never held in memory."""
        seen: dict[str, int] = {}
        try:
            with self._open() as stream:
                for number, raw, size in _lines(stream, self.max_line_bytes, digest):
                    if raw is None:
                        yield Entry(
                            number,
                            str(number),
                            error=f"the line is {size:,} bytes; at most {self.max_line_bytes:,}"
                            " are read (the max_line_bytes setting)",
                        )
                        continue
                    if number == 1:
                        raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                    if not raw.strip():
                        continue
                    entry = _entry(raw, number, seen, self.model_for, self.max_tokens)
                    if entry.refused and not self.refuse_requests:
                        entry = replace(entry, refused=False)
                    yield entry
        except OSError as exc:
            raise InputError(
                f"{self.display}: cannot be read ({exc.strerror or exc})",
                hint="check the path and its permissions",
            ) from None

    def scan(self) -> Scan:
        """Validate every line and hash the content, keeping only counts and the first problems."""
        digest = hashlib.sha256()
        result = Scan()
        for entry in self.entries(digest):
            if entry.error is None:
                result.valid += 1
                if entry.model is not None:
                    result.models.setdefault(entry.model, entry.line)
            elif entry.refused:
                result.refused += 1
            else:
                result.invalid += 1
                if len(result.problems) < MAX_REPORTED:
                    result.problems.append(f"{self.display}:{entry.line}: {entry.error}")
        result.sha256 = digest.hexdigest()
        if result.valid + result.invalid + result.refused == 0:
            raise InputError(f"{self.display}: empty file: no prompts to run")
        return result

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


def _spool(stream: IO[bytes], name: str) -> IO[bytes]:
    """Copy a stream that can be read only once into a temporary file."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by PromptFile.close()
    try:
        shutil.copyfileobj(stream, spool)
    except OSError as exc:
        spool.close()
        raise InputError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    return spool


def _lines(
    stream: IO[bytes], limit: int, digest: hashlib._Hash | None
) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes or None when longer than `limit`, length) for every line."""
    number = 0
    while raw := stream.readline(limit + 1):
        number += 1
        if digest is not None:
            digest.update(raw)
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield number, raw, len(raw)
            continue
        size = len(raw)
        while chunk := stream.readline(1 << 20):  # the rest of the line, skipped
            if digest is not None:
                digest.update(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):
                break
        yield number, None, size


class _Unclosable:
    """Lets `with` wrap the spooled stdin without closing it between passes."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def __enter__(self) -> IO[bytes]:
        return self._stream

    def __exit__(self, *exc: object) -> None:
        return None


def _entry(
    raw: bytes,
    number: int,
    seen: dict[str, int],
    model_for: ModelResolver | None,
    max_tokens: int,
) -> Entry:
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
    refusal: RequestError | None = None
    try:
        data = _load_object(text)
        check_strings(data)
        if "custom_id" in data:
            custom_id = check_custom_id(data["custom_id"])
        try:
            request, model = _parse(data, model_for, max_tokens)
        except RequestError as exc:
            refusal = exc
        if custom_id in seen:
            raise LineError(f"duplicate custom_id {custom_id!r} (first on line {seen[custom_id]})")
    except LineError as exc:
        return Entry(number, custom_id, error=str(exc), raw=_stored(text, raw))
    seen[custom_id] = number  # custom_ids stay unique, refused requests' too
    if refusal is not None:
        return Entry(number, custom_id, error=str(refusal), raw=_stored(text, raw), refused=True)
    return Entry(number, custom_id, request=request, raw=text, model=model)


def _parse(
    data: dict[str, Any], model_for: ModelResolver | None, max_tokens: int
) -> tuple[dict[str, Any], str | None]:
    """The stored request of a parsed line, and the model its OpenAI body names; a problem
    inside an OpenAI line's body is a RequestError."""
    openai = "body" in data or "url" in data
    model = None
    if openai:
        request, model = parse_openai_line(data, model_for)
    else:
        request = parse_request(data)
    if "json_schema" in request:
        limit = request.get("params", {}).get("max_tokens", max_tokens)
        try:
            request["json_schema"] = bound_schema(request["json_schema"], limit)
        except LineError as exc:
            if openai:
                raise RequestError(str(exc)) from None
            raise
    return request, model


def _stored(text: str, raw: bytes) -> str:
    """The raw line as an invalid item keeps it: what cannot be stored is escaped."""
    return text if _storable(text) else raw.decode("ascii", "backslashreplace")


def _storable(text: str) -> bool:
    try:
        check_strings(text)
    except LineError:
        return False
    return True


def _load_object(text: str) -> dict[str, Any]:
    try:
        data = parse_json(text)
    except JSONError as exc:
        raise LineError(str(exc)) from None
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

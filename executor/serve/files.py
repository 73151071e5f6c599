"""The bytes of uploaded and produced files, under the data folder, named by row id.

Uploads are parsed as they arrive (python-multipart's streaming parser): the file part goes
straight to disk in 64 KiB pieces, counted against the limit, so a 200 MB upload never sits
in memory and one over the limit stops at the limit (and leaves nothing behind).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from executor.paths import private_dir


class UploadTooLarge(Exception):
    pass


class BadUpload(Exception):
    pass


class FileStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, row_id: int) -> Path:
        """Where row `row_id`'s bytes live: an integer we made, never a client's text."""
        return self.folder / f"{int(row_id)}.jsonl"

    def ensure(self) -> None:
        """The folder, readable by this user only."""
        private_dir(self.folder)

    def open_new(self, row_id: int) -> BinaryIO:
        self.ensure()
        fd = os.open(self.path(row_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return os.fdopen(fd, "wb")

    def remove(self, row_id: int) -> None:
        with suppress(FileNotFoundError, NotADirectoryError):
            self.path(row_id).unlink()


class Upload:
    """One multipart/form-data request: the `file` part streamed to `sink`, small fields
    (purpose) kept; `filename` from the part's headers (shown, never used as a path)."""

    FIELD_LIMIT = 1024

    def __init__(self, content_type: str, sink: BinaryIO, limit: int) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise BadUpload("send the file as multipart/form-data (fields: file, purpose)")
        self.sink = sink
        self.limit = limit
        self.size = 0
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None
        self._value = bytearray()
        self._error: Exception | None = None
        self._ended = False  # the closing boundary came
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._add("_header_field", d[s:e]),
                "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    async def feed(self, chunks: AsyncIterator[bytes]) -> None:
        """Parse the body as it arrives; BadUpload if it is not multipart/form-data or ends
        before its closing boundary (a cut-off upload is not a file)."""
        async for chunk in chunks:
            try:
                self.parser.write(chunk)
            except ValueError as exc:  # python-multipart's parse errors are ValueErrors
                raise BadUpload(f"the body is not valid multipart/form-data ({exc})") from None
            if self._error is not None:
                raise self._error
        try:
            self.parser.finalize()
        except ValueError as exc:
            raise BadUpload(f"the body is not valid multipart/form-data ({exc})") from None
        if self.filename is None:
            raise BadUpload("no file part: send the JSONL file in a field named 'file'")
        if not self._ended:
            raise BadUpload(
                "the upload ended before its closing boundary (cut off?); nothing was kept"
            )

    def _end(self) -> None:
        self._ended = True

    def _add(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _part_begin(self) -> None:
        self._headers = {}
        self._part = None
        self._value = bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if "filename" in {k.decode() for k in options} or name == "file":
            if name != "file" or self.filename is not None:
                self._error = BadUpload("one file, in a field named 'file'")
            raw = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            self.filename = os.path.basename(raw.replace("\\", "/"))[:255] or "upload.jsonl"
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._error is not None:
            return
        piece = data[start:end]
        if self._part == "file":
            self.size += len(piece)
            if self.size > self.limit:
                self._error = UploadTooLarge(f"the file is over the {self.limit:,}-byte limit")
                return
            self.sink.write(piece)
        else:
            self._value += piece
            if len(self._value) > self.FIELD_LIMIT:
                self._error = BadUpload(f"field {self._part!r} is too long")

    def _part_end(self) -> None:
        if self._part and self._part != "file":
            self.fields[self._part] = self._value.decode("utf-8", "replace")

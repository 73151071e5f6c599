"""A GGUF file's header read directly: key/values and the tensor table, never the weights.

gguf-py's GGUFReader builds a numpy view of every string of the vocabulary: for a model with
a 200,000-token vocabulary that is 6 s before anything can be planned. This reader keeps
scalars and short arrays, skips long arrays (counting them), and checks the file is as long
as its tensor table says (a truncated download is named, with both sizes).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from executor.errors import ModelError
from executor.gguf.types import GGML_TYPES

MAGIC = b"GGUF"
LONG_ARRAY = 1024  # arrays longer than this are counted, not kept
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class LongArray:
    """An array the reader skipped: its element type and length."""

    type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0, ne1, ...
    type: int
    offset: int  # from the start of the data region
    n_bytes: int


@dataclass(frozen=True)
class Header:
    fields: dict[str, Any]
    tensors: list[TensorEntry]
    data_start: int
    file_size: int


class _Stream:
    """Buffered little-endian reads with a position, over a file."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.buffer = b""
        self.pos = 0  # within buffer
        self.base = 0  # file offset of buffer[0]

    def _fill(self, n: int) -> None:
        """Have at least `n` bytes from pos on in the buffer (EOFError at the file's end)."""
        rest = self.buffer[self.pos :]
        self.base += self.pos
        self.buffer = rest + self.f.read(max(n, 1 << 20))
        self.pos = 0
        if n > len(self.buffer):
            raise EOFError

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buffer):
            self._fill(n)
        data = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return data

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 30:
            raise ValueError(f"a string of {n} bytes")
        return self.take(n).decode("utf-8", "replace")

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings (a vocabulary: 50,000-250,000 of them) within the buffer,
        without a bytes object per string."""
        for _ in range(count):
            if self.pos + 8 > len(self.buffer):
                self._fill(8)
            (n,) = _U64.unpack_from(self.buffer, self.pos)
            if n > 1 << 30:
                raise ValueError(f"a string of {n} bytes")
            if self.pos + 8 + n <= len(self.buffer):
                self.pos += 8 + n
            else:
                self.pos += 8
                self.take(n)

    @property
    def offset(self) -> int:
        return self.base + self.pos


def read_header(path: Path) -> Header:
    """The header of the GGUF at `path`; ModelError if it is not a readable, complete GGUF.
    Remembered per (path, size, mtime): a load checks the file and then plans from it."""
    size = 0
    try:
        st = path.stat()
        size = st.st_size
        return _cached(str(path), st.st_size, st.st_mtime_ns)
    except ModelError:
        raise
    except EOFError:
        raise ModelError(f"{path}: truncated GGUF header (the file is {size:,} bytes)") from None
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from None


@functools.lru_cache(maxsize=8)
def _cached(path: str, size: int, mtime_ns: int) -> Header:
    with open(path, "rb") as f:
        return _read(_Stream(f), size, Path(path))


def _read(s: _Stream, size: int, path: Path) -> Header:
    if s.take(4) != MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
    version = s.unpack("<I")
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = s.unpack("<Q"), s.unpack("<Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 20:
        raise ValueError(f"{n_tensors} tensors and {n_kv} keys")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = s.string()
        fields[key] = _value(s, s.unpack("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = s.string()
        n_dims = s.unpack("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(s.unpack("<Q") for _ in range(n_dims))
        ttype, offset = s.unpack("<I"), s.unpack("<Q")
        tensors.append(TensorEntry(name, shape, ttype, offset, _nbytes(name, shape, ttype)))
    alignment = int(fields.get("general.alignment", 32) or 32)
    data_start = -(-s.offset // alignment) * alignment
    end = max((t.offset + t.n_bytes for t in tensors), default=0) + data_start
    if end > size:
        raise ModelError(
            f"{path} is truncated or corrupt: its tensor table needs {end:,} bytes, "
            f"the file has {size:,}",
            hint="download it again (compare its size and sha256 with the source)",
        )
    return Header(fields, tensors, data_start, size)


def _value(s: _Stream, vtype: int) -> Any:
    if vtype in _SCALARS:
        return s.unpack(_SCALARS[vtype])
    if vtype == STRING:
        return s.string()
    if vtype == ARRAY:
        etype, count = s.unpack("<I"), s.unpack("<Q")
        if count > LONG_ARRAY:
            if etype == STRING:
                s.skip_strings(count)
            elif etype in _SCALARS:
                s.take(struct.calcsize(_SCALARS[etype]) * count)
            else:
                raise ValueError(f"an array of type {etype}")
            return LongArray(etype, count)
        return [_value(s, etype) for _ in range(count)]
    raise ValueError(f"unknown value type {vtype}")


def _nbytes(name: str, shape: tuple[int, ...], ttype: int) -> int:
    try:
        _, block, size = GGML_TYPES[ttype]
    except KeyError:
        raise ValueError(f"tensor {name} has an unknown type {ttype}") from None
    elements = 1
    for d in shape:
        elements *= d
    return elements // block * size

"""Reading and writing the files users name, so that any wrong one is one clear line.

Reading: a missing file, a directory, a FIFO or device where a regular file belongs, no
permission, not UTF-8, too large, YAML whose aliases expand too far (a "billion laughs" bomb), JSON
with NaN, duplicate keys or nesting too deep: each is a UsageError naming the file and what to
do. Writing: `output_target` writes a regular file atomically, follows a symlink to its target,
streams to a device or FIFO (`-o /dev/stdout`), and refuses a directory.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import yaml

from executor.errors import UsageError

MAX_TEXT_FILE = 16 * 2**20  # configs, job specs and schemas are small
MAX_YAML_VALUES = 100_000  # a job spec or config file holds dozens
MAX_JSON_DEPTH = 64
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def regular_file(path: Path, what: str) -> Path:
    """`path` if it is a readable regular file; UsageError saying what it is otherwise."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise UsageError(f"{what} {path}: permission denied") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or special file"
        raise UsageError(f"{what} {path} is {kind}, not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path}: permission denied")
    return path


def read_text(path: Path, what: str, limit: int = MAX_TEXT_FILE) -> str:
    """A small UTF-8 text file (a byte-order mark is dropped)."""
    regular_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit // 2**20} MiB")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _expanded_size(root: yaml.Node, where: str) -> int:
    """How many values the document holds once every alias is expanded, counted without
    expanding (each node's size is remembered): nested aliases grow exponentially, a few
    hundred bytes can stand for billions of values (a "billion laughs" bomb)."""
    sizes: dict[int, int] = {}
    started: set[int] = set()  # nodes whose children are being counted: the path from root
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack[-1]
        if id(node) in sizes:
            stack.pop()
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if any(id(c) in started and id(c) not in sizes for c in children):
            raise UsageError(f"{where}: a value holds itself (a recursive alias)")
        waiting = [c for c in children if id(c) not in sizes]
        if id(node) not in started and waiting:
            started.add(id(node))
            stack.extend(waiting)
            continue
        stack.pop()
        sizes[id(node)] = min(1 + sum(sizes.get(id(c), 1) for c in children), 2**62)
    return sizes[id(root)]


def _refuse_duplicate_keys(root: yaml.Node, where: str) -> None:
    """A key written twice in one mapping: YAML keeps the last silently; a setting typed
    twice is a mistake to show (JSON lines refuse duplicate keys too)."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[object, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if key.value in keys and key.value != "<<":
                        raise UsageError(
                            f"{where}:{line}: key {key.value!r} is given twice (first on line "
                            f"{keys[key.value]}); keep one"
                        )
                    keys[key.value] = line
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_yaml(text: str, where: str) -> Any:
    """Safe YAML whose expanded size is bounded; UsageError naming `where`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node, where)
        if node is not None and (size := _expanded_size(node, where)) > MAX_YAML_VALUES:
            raise UsageError(
                f"{where}: its aliases (*name) expand to {size:,} values, more than any "
                f"settings file holds ({MAX_YAML_VALUES:,}): refused as a YAML bomb"
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise UsageError(f"{where}: not valid YAML: {exc}") from None
    except RecursionError:
        raise UsageError(f"{where}: nested too deeply to be a settings file") from None
    finally:
        loader.dispose()
    check_finite(data, where)
    return data


def check_finite(value: Any, where: str) -> None:
    """NaN and infinities are no numbers a setting can hold (YAML writes them .nan, .inf)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and (item != item or item in (float("inf"), float("-inf"))):
            raise UsageError(f"{where}: {item} is not a number a setting can hold")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class JSONError(ValueError):
    """What is wrong with a JSON text, in words for a person."""


def _no_constants(name: str) -> Any:
    raise JSONError(f"{name} is not valid JSON (numbers must be finite)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise JSONError(f"duplicate key {key!r}")
        data[key] = value
    return data


def parse_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys, bounded nesting and number length.
    JSONError says what is wrong."""
    brackets = text.count("[") + text.count("{")  # C speed: most lines stop here
    depth = _max_depth(text) if brackets > MAX_JSON_DEPTH else brackets
    if depth > MAX_JSON_DEPTH:
        raise JSONError(f"nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        return json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise JSONError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise JSONError("nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        if isinstance(exc, JSONError):
            raise
        if "digits" in str(exc):
            raise JSONError("a number too long to read (more than 4300 digits)") from None
        raise JSONError(f"not valid JSON: {exc}") from None


def _max_depth(text: str) -> int:
    """How deep brackets nest, ignoring those inside strings (cheap, before parsing)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


# --- writing ------------------------------------------------------------------------------------


def private_dir(path: Path) -> Path:
    """Create `path` and every missing parent readable by this user only, whatever the
    umask (mkdir's mode is filtered by it, and parents would get the umask's default); an
    existing folder is left as it is."""
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # a twin made it meanwhile
        os.chmod(folder, PRIVATE_DIR)
    return path


@contextmanager
def output_target(target: str | None, what: str = "output") -> Iterator[TextIO]:
    """Where results go: stdout (None or '-'), a device or FIFO written as a stream, or a file
    written atomically (a temporary beside it, renamed over it at the end; a symlink is
    followed, so its target is replaced and the link stays). Files are 0600."""
    if target in (None, "-"):
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(target)
    try:
        mode = path.stat().st_mode  # follows symlinks
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise UsageError(
            f"{what} {path}: cannot write in {_first_existing(path.parent)} (not a folder)"
        ) from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"{what} {path} is a directory; name a file inside it")
    if mode is not None and not stat.S_ISREG(mode):
        # A device or a FIFO (/dev/stdout, /dev/null, a named pipe): write to it as it is.
        try:
            stream = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UsageError(f"{what} {path}: cannot write ({exc.strerror or exc})") from None
        with stream:
            yield stream
        return
    real = path.resolve()  # a symlink's target is what gets replaced
    try:
        private_dir(real.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as exc:
        raise UsageError(
            f"{what} {path}: cannot write in {real.parent} ({exc.strerror or exc})"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: Path, what: str) -> None:
    """Fail now, not after hours of work, if `path` cannot be written later: a directory, or
    a place under something that is not a folder."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory; name a file inside it")
    parent = _first_existing(path.parent)
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {path}: {parent} is not writable")


def _first_existing(path: Path) -> Path:
    """`path` or the nearest folder above it that exists (or is a file in the way)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def same_file(a: str | None, b: str | None) -> bool:
    """Whether two output names are the same file (after symlinks), when both are files."""
    if a in (None, "-") or b in (None, "-"):
        return a == b and a is not None
    return Path(a).resolve() == Path(b).resolve()

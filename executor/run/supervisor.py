"""The parent's side of the model process: start it, feed it a batch, notice when it dies."""

from __future__ import annotations

import atexit
import errno
import logging
import multiprocessing as mp
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from executor.engine.child import main as child_main
from executor.engine.faults import Faults
from executor.engine.probes import ModelLoadFailed, describe_exit
from executor.engine.protocol import (
    AskCapabilities,
    Batch,
    BatchDone,
    Capabilities,
    Drop,
    ItemDone,
    ItemFailed,
    ItemStarted,
    Load,
    LoadSpec,
    Progress,
    Ready,
    Stop,
)
from executor.errors import DiskError
from executor.params import GenerationRequest
from executor.paths import private_dir

log = logging.getLogger(__name__)

LOG_ROTATE_BYTES = 20 * 2**20
TAIL_BYTES = 4000


@dataclass(frozen=True)
class Died:
    """The model process ended without being asked to: `reason` says how, with its log tail."""

    reason: str
    exitcode: int | None


@dataclass(frozen=True)
class Tick:
    """Nothing happened for a while: time for heartbeats, progress and stop checks."""


Event = ItemStarted | ItemDone | ItemFailed | Progress | Died | Tick | BatchDone


_LIVE: weakref.WeakSet[ModelProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """No model process outlives its parent: it ignores SIGTERM (stopping is the parent's
    decision), so multiprocessing's own exit handler, which sends SIGTERM and waits, would
    wait forever. Registered after multiprocessing's handler, so it runs first."""
    for proc in list(_LIVE):
        proc.kill()
    for spare in list(_SPARES):
        spare.kill()


class Spare:
    """A model process spawned before its load spec is known: Python starts and llama.cpp is
    imported while the parent counts prompts and plans (a plain loop pays these once too; we
    no longer pay them one after the other)."""

    def __init__(self, log_path: Path, engine: str, gpu_uuid: str | None) -> None:
        self.log_path = log_path
        self.engine = engine
        self.gpu_uuid = gpu_uuid
        self.log_offset = _start_log(log_path)
        self._capabilities: Capabilities | None = None
        # spawn, not fork: the parent holds SQLite connections and threads that must not be
        # copied, and the child starts with a clean CUDA state.
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process: mp.process.BaseProcess = ctx.Process(
            target=child_main,
            args=(child_conn, str(log_path), engine, gpu_uuid),
            name="executor-model",
            daemon=True,
        )
        self.process.start()
        _SPARES.add(self)
        child_conn.close()

    def gpu_offload(self, timeout: float = 120.0) -> bool | None:
        """Whether this build of llama.cpp can offload to a GPU, asked of the spare itself
        (it has imported llama.cpp by the time it answers); None when it cannot say."""
        if self._capabilities is None and self.process.is_alive():
            try:
                self.conn.send(AskCapabilities())
                if self.conn.poll(timeout):
                    answer = self.conn.recv()
                    if isinstance(answer, Capabilities):
                        self._capabilities = answer
            except (EOFError, OSError):
                pass
        return None if self._capabilities is None else self._capabilities.gpu_offload

    def fits(self, spec: LoadSpec, log_path: Path) -> bool:
        """Whether this spare can load `spec` (same engine, GPU and log)."""
        wanted = (spec.engine, spec.gpu_uuid, log_path)
        return self.process.is_alive() and wanted == (self.engine, self.gpu_uuid, self.log_path)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()
        _SPARES.discard(self)


_SPARES: weakref.WeakSet[Spare] = weakref.WeakSet()


def _start_log(log_path: Path) -> int:
    """Rotate the engine log if large, mark a new process in it; the offset where its lines
    start. DiskError if it cannot be written."""
    try:
        _rotate(log_path)
        private_dir(log_path.parent)
        with open(log_path, "a", encoding="utf-8") as engine_log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            engine_log.write(f"--- {stamp} starting a model process\n")
        return log_path.stat().st_size
    except OSError as exc:
        full = exc.errno == errno.ENOSPC
        raise DiskError(
            f"cannot write the model process's log {log_path} ("
            + ("the disk is full" if full else exc.strerror or str(exc))
            + ")",
            hint="free space there, or point XDG_STATE_HOME elsewhere; no item was "
            "started, all stay queued",
        ) from None


class ModelProcess:
    """One child process holding one loaded model."""

    def __init__(
        self,
        spec: LoadSpec,
        log_path: Path,
        faults: Faults | None = None,
        *,
        spare: Spare | None = None,
    ) -> None:
        self.spec = spec
        self.log_path = log_path
        self.faults = faults or Faults()
        self.info: dict[str, Any] = {}
        self._spare = spare if spare is not None and spare.fits(spec, log_path) else None
        if spare is not None and self._spare is None:
            spare.kill()
        self._process: mp.process.BaseProcess | None = None
        self._conn: Any = None
        self._log_offset = 0
        self._batches = 0  # Batch messages sent

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, *, abort: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Load the model in the spare process (or a new one) and wait until it is loaded;
        raise ModelLoadFailed if not."""
        spare = self._spare or Spare(self.log_path, self.spec.engine, self.spec.gpu_uuid)
        self._spare = None
        _SPARES.discard(spare)
        self._process, self._conn, self._log_offset = spare.process, spare.conn, spare.log_offset
        _LIVE.add(self)
        with suppress(OSError):  # if it died already, the wait below says how
            self._conn.send(Load(self.spec, self.faults))
        started = time.monotonic()
        while True:
            ready = wait([self._conn, self._process.sentinel], timeout=0.5)
            if self._conn in ready:
                try:
                    message = self._conn.recv()
                except EOFError:
                    ready = [self._process.sentinel]
                else:
                    if isinstance(message, Ready):
                        self.info = message.info
                        log.info(
                            "model loaded in %.1fs (pid %s): %s",
                            time.monotonic() - started,
                            self.pid,
                            self.info,
                        )
                        return self.info
                    self.kill()
                    raise ModelLoadFailed(f"{message.reason}{self._tail_note()}", crashed=False)
            if self._process.sentinel in ready:
                self._process.join()
                raise ModelLoadFailed(self._death_reason("while loading"), crashed=True)
            if abort():
                self.kill()
                raise ModelLoadFailed("interrupted while loading", crashed=False)

    def run(
        self,
        requests: list[GenerationRequest],
        *,
        tick_seconds: float = 1.0,
        stall_seconds: float | None = None,
    ) -> Iterator[Event]:
        """Send a batch; yield what happens until it and every batch `extend` adds meanwhile
        are done, or the process dies. A process that sends nothing for `stall_seconds` (it
        reports progress every second while it decodes) is hung: it is killed and reported
        as dead."""
        assert self._process is not None and self._conn is not None
        if not self.extend(requests):
            yield self._died()
            return
        heard = time.monotonic()
        while True:
            ready = wait([self._conn, self._process.sentinel], timeout=tick_seconds)
            if not ready:
                if stall_seconds and time.monotonic() - heard > stall_seconds:
                    self.kill()
                    yield Died(
                        f"model process made no progress for {stall_seconds:g}s (hung?); killed"
                        f"{self._tail_note()}",
                        None,
                    )
                    return
                yield Tick()
                continue
            if self._conn in ready:
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    yield self._died()
                    return
                heard = time.monotonic()
                if isinstance(message, BatchDone):
                    if message.number < self._batches:
                        continue  # idle a moment before the next batch arrived: it runs now
                    yield message
                    return
                yield message
                continue
            # The sentinel fired and no message is pending: the process is gone.
            yield self._died()
            return

    def extend(self, requests: list[GenerationRequest]) -> bool:
        """Queue more requests behind those in flight (during `run`); False if the process
        is gone."""
        assert self._conn is not None
        self._batches += 1
        try:
            self._conn.send(Batch(requests, self._batches))
        except (BrokenPipeError, OSError):
            return False
        return True

    def drop(self, item_ids: list[int]) -> None:
        """Tell the process to skip these items of the current batch (not yet started)."""
        if self._conn is not None and item_ids:
            with suppress(OSError):  # already dead: the death is reported by run()
                self._conn.send(Drop(item_ids))

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the process to exit after its current item; kill it if it does not."""
        if self._process is None:
            return
        with suppress(OSError):
            self._conn.send(Stop())
        self._process.join(timeout)
        self.kill()

    def kill(self) -> None:
        """End the process now (SIGKILL): the in-flight items are the caller's to release."""
        if self._process is None:
            return
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process = None
        self._conn = None

    def log_tail(self) -> str:
        """The end of what this process wrote to the engine log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                start = max(self._log_offset, size - TAIL_BYTES)
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return text.strip()

    def _died(self) -> Died:
        assert self._process is not None
        self._process.join(5)
        exitcode = self._process.exitcode
        reason = self._death_reason("while generating")
        self.kill()
        return Died(reason, exitcode)

    def _death_reason(self, when: str) -> str:
        assert self._process is not None
        return f"model process {describe_exit(self._process.exitcode)} {when}{self._tail_note()}"

    def _tail_note(self) -> str:
        tail = self.log_tail()
        if not tail:
            return ""
        lines = tail.splitlines()[-12:]
        return "\n--- engine log tail ---\n" + "\n".join(lines)


def _rotate(path: Path) -> None:
    """Keep the engine log bounded: one previous generation is kept as .1."""
    try:
        if path.stat().st_size > LOG_ROTATE_BYTES:
            path.replace(path.with_suffix(path.suffix + ".1"))
    except FileNotFoundError:
        pass

"""The model process: loads the engine once, then generates the items the parent sends.

The messages over the pipe are the dataclasses of `executor.engine.protocol` (its docstring has the
order).

llama.cpp aborts the whole process on a CUDA error during decode, so nothing here tries to
survive that: the parent notices the death and re-queues what was in flight.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from executor.engine import Engine, LoadError, create_engine
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
    LoadFailed,
    LoadSpec,
    Progress,
    Ready,
    Stop,
)
from executor.outcomes import FailCode, ResultRecord
from executor.params import GenerationRequest

PR_SET_PDEATHSIG = 1


def main(conn: Connection, log_path: str, engine_name: str, gpu_uuid: str | None) -> None:
    """Entry point of the spawned model process: imports its engine at once, then waits for
    the Load message (the parent plans meanwhile: the start-up costs overlap)."""
    _redirect_output(log_path)
    if gpu_uuid and gpu_uuid != "planned":
        # CUDA then sees only this worker's GPU (UUIDs avoid CUDA/NVML index mismatches);
        # set before llama.cpp is imported, so before CUDA can initialise.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_uuid
    # Signals are the parent's business: Ctrl-C on a terminal and systemd's SIGTERM reach the
    # whole process group, but stopping (finish or release the item in flight) is decided there.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if engine_name == "llama":
        import executor.engine.llama  # noqa: F401 - llama.cpp's import, before the spec comes
    try:
        message = conn.recv()
        while isinstance(message, AskCapabilities):
            conn.send(_capabilities(engine_name))
            message = conn.recv()
    except (EOFError, OSError):
        return  # not needed after all
    if not isinstance(message, Load):
        return
    spec = message.spec
    print(f"executor model process {os.getpid()}: loading {spec}", file=sys.stderr, flush=True)
    try:
        engine = create_engine(spec, message.faults)
    except LoadError as exc:
        conn.send(LoadFailed(str(exc)))
        return
    except Exception as exc:  # a bad file, an unsupported architecture, ...
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(engine.describe()))
    try:
        _serve(conn, engine)
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone; nothing is left to report to
    finally:
        engine.close()


def _capabilities(engine_name: str) -> Capabilities:
    if engine_name == "llama":
        from executor.engine.llama_setup import capabilities

        return Capabilities(**capabilities())
    return Capabilities(version="fake", gpu_offload=True)  # the fake engine plays a GPU build


def _serve(conn: Connection, engine: Engine) -> None:
    while True:
        message = conn.recv()
        if isinstance(message, Stop):
            return
        if isinstance(message, Batch):
            sink = _PipeSink(conn, message.number)
            engine.run_batch(message.requests, sink)
            if sink.stop:
                return
            conn.send(BatchDone(sink.last_batch))


class _PipeSink:
    """Reports to the parent over the pipe; reads its drops and stops between steps."""

    def __init__(self, conn: Connection, batch: int) -> None:
        self.conn = conn
        self.drops: set[int] = set()
        self.stop = False
        self.last_batch = batch  # the newest batch whose requests the engine has
        self._incoming: list[GenerationRequest] = []
        self._told = time.monotonic()

    def progress(self, tokens: Callable[[], dict[int, int]]) -> None:
        now = time.monotonic()
        if now - self._told >= 1.0:
            self.conn.send(Progress(tokens()))
            self._told = now

    def started(self, item_id: int) -> None:
        self.conn.send(ItemStarted(item_id))

    def finished(self, item_id: int, record: ResultRecord) -> None:
        self.conn.send(ItemDone(item_id, record))

    def failed(self, item_id: int, reason: str, code: FailCode = FailCode.FAILED) -> None:
        self.conn.send(ItemFailed(item_id, reason, code))

    def _read(self) -> None:
        while self.conn.poll():
            message = self.conn.recv()
            if isinstance(message, Drop):
                self.drops.update(message.item_ids)
            elif isinstance(message, Stop):
                self.stop = True
            elif isinstance(message, Batch):
                self._incoming.extend(message.requests)
                self.last_batch = message.number

    def dropped(self) -> set[int]:
        self._read()
        return self.drops

    def stop_requested(self) -> bool:
        self._read()
        return self.stop

    def more(self) -> list[GenerationRequest]:
        self._read()
        incoming, self._incoming = self._incoming, []
        return incoming


def dry_run_main(conn: Connection, spec: LoadSpec | None, allocate: bool = False) -> None:
    """Entry point of a short-lived process that asks llama.cpp for a dry run (or, without a
    spec, what the build can do)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        from executor.engine.llama_setup import capabilities, dry_run

        if spec is None:
            conn.send(("capabilities", capabilities()))
        else:
            conn.send(("dry_run", dry_run(spec, allocate=allocate)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def counter_main(conn: Connection, engine: str, model_path: str) -> None:
    """Entry point of a short-lived process that counts prompt tokens: the parent sends lists
    of GenerationRequest and gets a list of counts (None: cannot be built) for each; None
    ends it. A vocabulary-only load: no weights are read."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        if engine == "fake":
            from executor.engine.fake import FakeCounter

            counter: Any = FakeCounter()
        else:
            from executor.engine.prompts import TokenCounter

            counter = TokenCounter(model_path)
    except Exception as exc:
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready({}))
    try:
        while (requests := conn.recv()) is not None:
            conn.send(counter.count(requests))
    except (EOFError, BrokenPipeError):
        pass
    finally:
        counter.close()


def _redirect_output(log_path: str) -> None:
    """Send this process's stdout and stderr (llama.cpp's log included) to the engine log."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # prompts and answers may appear in it: this user only
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent dies, so no orphan keeps holding VRAM."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the broken pipe ends us after the item in flight
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)

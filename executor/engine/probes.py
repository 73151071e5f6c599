"""Short-lived engine processes the parent starts to ask llama.cpp something (the parent
never imports llama.cpp): a dry run's exact sizes, what the installed build can do, how many
tokens prompts are. Each is a spawned process running an entry point of engine/child.py."""

from __future__ import annotations

import multiprocessing as mp
import signal
from contextlib import suppress
from typing import Any

from executor.engine.child import counter_main, dry_run_main
from executor.engine.protocol import DryRun, GenerationRequest, LoadSpec, Ready


class ModelLoadFailed(Exception):
    """The model process could not load the model; `reason` includes the log tail."""

    def __init__(self, reason: str, *, crashed: bool) -> None:
        super().__init__(reason)
        self.crashed = crashed


def dry_run(spec: LoadSpec, timeout: float = 300.0, *, allocate: bool = False) -> DryRun | str:
    """llama.cpp's own sizes for `spec` from a no_alloc load in a throwaway process.

    Returns the reason instead when it cannot run (no llama-cpp-python, a crash, a timeout):
    the caller then keeps the pure estimate.
    """
    kind, payload = _ask_engine(spec, allocate, timeout)
    return payload if kind == "dry_run" else str(payload)


def engine_capabilities(timeout: float = 120.0) -> dict[str, Any] | str:
    """llama-cpp-python's version and GPU offload support, asked in a throwaway process
    (the parent never imports llama.cpp); the reason instead when it cannot say."""
    kind, payload = _ask_engine(None, False, timeout)
    return payload if kind == "capabilities" else str(payload)


def _ask_engine(spec: LoadSpec | None, allocate: bool, timeout: float) -> tuple[str, Any]:
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    process = ctx.Process(
        target=dry_run_main, args=(child_conn, spec, allocate), daemon=True, name="executor-dry-run"
    )
    process.start()
    child_conn.close()
    try:
        if not parent_conn.poll(timeout):
            return "error", "llama.cpp did not answer in time"
        return parent_conn.recv()
    except (EOFError, OSError):
        process.join(5)
        return "error", f"the llama.cpp process {describe_exit(process.exitcode)}"
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        parent_conn.close()


class PromptCounter:
    """Counts prompt tokens in a throwaway process (the parent never imports llama.cpp): the
    tokens the model process will see, chat template included, before the model is loaded."""

    def __init__(self, engine: str, model_path: str, timeout: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=counter_main,
            args=(child_conn, engine, model_path),
            daemon=True,
            name="executor-counter",
        )
        self._process.start()
        child_conn.close()
        try:
            if not self._conn.poll(timeout):
                raise ModelLoadFailed("counting tokens: llama.cpp did not answer", crashed=True)
            ready = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise ModelLoadFailed(
                f"counting tokens: the process {describe_exit(self._process.exitcode)}",
                crashed=True,
            ) from None
        if not isinstance(ready, Ready):
            self.close()
            raise ModelLoadFailed(f"counting tokens: {ready.reason}", crashed=False)

    def count(self, requests: list[GenerationRequest]) -> list[int | None]:
        try:
            self._conn.send(requests)
            return self._conn.recv()
        except (EOFError, OSError):
            raise ModelLoadFailed(
                f"counting tokens: the process {describe_exit(self._process.exitcode)}",
                crashed=True,
            ) from None

    def close(self) -> None:
        with suppress(OSError):
            self._conn.send(None)
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def __enter__(self) -> PromptCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_exit(exitcode: int | None) -> str:
    """'was killed by SIGKILL', 'exited with code 1', ..."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"

"""The model side: an engine loads a model once and generates batches of requests.

Only `executor.engine.llama` imports llama_cpp; the fake engine in `executor.engine.fake` answers
deterministically for tests. Both run inside the child process (`executor.engine.child`); what
crosses the pipe is defined in `executor.engine.protocol`. Nothing here imports the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from executor.engine.protocol import LoadSpec
from executor.outcomes import FailCode, ResultRecord
from executor.params import GenerationRequest

if TYPE_CHECKING:
    from executor.engine.faults import Faults


class ItemError(Exception):
    """This one item cannot be generated (e.g. its prompt is longer than the context)."""

    def __init__(self, message: str, code: FailCode = FailCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


class LoadError(Exception):
    """The model could not be loaded (missing, corrupt, or out of memory)."""


class BatchSink(Protocol):
    """Where an engine reports on a batch, and learns what the parent asked meanwhile."""

    def started(self, item_id: int) -> None: ...

    def finished(self, item_id: int, record: ResultRecord) -> None: ...

    def failed(self, item_id: int, reason: str, code: FailCode = FailCode.FAILED) -> None:
        """This item alone failed (prompt too long, template error); the batch goes on."""
        ...

    def dropped(self) -> set[int]:
        """Items of the batch not to start (the parent released them)."""
        ...

    def more(self) -> list[GenerationRequest]:
        """Requests the parent sent since the last call, to queue behind the batch's: the
        parent tops the queue up before it drains, so slots stay full."""
        ...

    def progress(self, tokens: Callable[[], dict[int, int]]) -> None:
        """Called after every decode step: the model is alive. `tokens()` gives what each
        item in flight has generated so far (called only when a report is due)."""
        ...

    def stop_requested(self) -> bool: ...


class Engine(Protocol):
    """A loaded model that generates a batch of requests, several at a time if it can."""

    def run_batch(self, requests: list[GenerationRequest], sink: BatchSink) -> None:
        """Generate every request not dropped, and those `sink.more()` adds, reporting each
        through `sink` as it ends; return when none is left."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts about the loaded model for the logs (context size, GPU layers, ...)."""
        ...

    def close(self) -> None: ...


def create_engine(spec: LoadSpec, faults: Faults | None = None) -> Engine:
    """Load the engine named by the spec (inside the model process)."""
    from executor.engine.faults import Faults

    faults = faults or Faults()
    if spec.engine == "fake":
        from executor.engine.fake import FakeEngine

        return FakeEngine(spec, faults)
    from executor.engine.llama import LlamaEngine

    return LlamaEngine(spec, faults)

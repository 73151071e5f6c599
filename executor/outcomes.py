"""How one item ends: the result the model process returns, or why it failed. Core: the
model process makes them, the store keeps them, the exports state them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FailCode(StrEnum):
    """Why one item failed, kept with it: OpenAI's batch output answers the request's own
    faults with a 400 and the server's with a 500 (`CLIENT_FAULTS`)."""

    INVALID_REQUEST = "invalid_request"  # the line was refused (n > 1, an unknown model, ...)
    CONTEXT_LENGTH = "context_length_exceeded"  # the prompt does not fit the context
    BAD_SCHEMA = "invalid_json_schema"  # no grammar can be made from its json_schema
    BAD_PROMPT = "invalid_prompt"  # its messages cannot be rendered with the chat template
    SCHEMA_NOT_MET = "json_schema_not_met"  # the output does not meet its json_schema
    CRASHED = "crashed"  # it crashed the model process max_attempts times
    UNSTORABLE = "unstorable_output"  # the answer holds what no database can store
    MODEL_FAILED = "model_failed"  # the job's model would not load at all
    FAILED = "generation_failed"  # anything else


CLIENT_FAULTS = frozenset(
    {FailCode.INVALID_REQUEST, FailCode.CONTEXT_LENGTH, FailCode.BAD_SCHEMA, FailCode.BAD_PROMPT}
)


@dataclass(frozen=True)
class ResultRecord:
    """What the model process returns for one item."""

    output: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    total_ms: float
    prompt_ms: float | None = None
    generation_ms: float | None = None

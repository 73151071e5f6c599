"""Prompts as the model sees them: the chat template applied and the text tokenized exactly as
llama-cpp-python's create_completion / create_chat_completion do; and counting them for a whole
job before its model is loaded (a vocabulary-only load), so the context can fit the work."""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from executor.engine import ItemError, LoadError
from executor.outcomes import FailCode
from executor.params import GenerationRequest

TEMPLATE_SECONDS = 10.0  # templates render in microseconds; a loop in one must not hang


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """ItemError when the block runs longer than `seconds` (SIGALRM: the model process's and
    the counter's main thread; elsewhere the block runs unbounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise ItemError(f"{what} did not finish in {seconds:g}s", FailCode.BAD_PROMPT)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Prompter:
    """Turns requests into tokens with a loaded model's vocabulary and chat template."""

    def __init__(self, model: Any) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.chat = _chat_formatter(model, self.vocab)

    def prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        """Tokens of the prompt, as create_completion/create_chat_completion make them, and
        the extra stop strings the chat template implies."""
        if request.messages is None:
            assert request.prompt is not None
            return self.tokenize(request.prompt.encode(), add_bos=True), []
        if self.chat is None:
            raise ItemError(
                "this model has no chat template: send a raw 'prompt' instead",
                FailCode.BAD_PROMPT,
            )
        with time_limit(TEMPLATE_SECONDS, "the chat template"):
            formatted = self.chat(messages=request.messages)
        tokens = self.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special)
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop]
        return tokens, [s for s in stops if s]

    def tokenize(self, text: bytes, *, add_bos: bool) -> list[int]:
        size = len(text) + 8
        buffer = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self.vocab, text, len(text), buffer, size, add_bos, True)
        if n < 0:
            size = -n
            buffer = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, text, len(text), buffer, size, add_bos, True)
        return list(buffer[:n])


@llama_cpp.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


class TokenCounter:
    """Counts prompt tokens with a vocabulary-only load of a model (no weights are read)."""

    def __init__(self, model_path: str) -> None:
        llama_cpp.llama_backend_init()
        # Nothing to log: errors come back as the exception below.
        llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
        mparams = llama_cpp.llama_model_default_params()
        mparams.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
        if not self.model:
            raise LoadError(f"llama.cpp could not read the vocabulary of {model_path}")
        self.prompter = Prompter(self.model)

    def count(self, requests: Iterable[GenerationRequest]) -> list[int | None]:
        """Prompt tokens per request; None where the prompt cannot be built (the item then
        fails with the reason when it runs)."""
        counts: list[int | None] = []
        for request in requests:
            try:
                counts.append(len(self.prompter.prompt_tokens(request)[0]))
            except Exception:
                counts.append(None)
        return counts

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)


def _chat_formatter(model: Any, vocab: Any) -> Jinja2ChatFormatter | None:
    """The model's own chat template, set up as llama-cpp-python sets it up."""
    template = _meta(model, "tokenizer.chat_template")
    if not template:
        return None
    eos = llama_cpp.llama_vocab_eos(vocab)
    bos = llama_cpp.llama_vocab_bos(vocab)
    return Jinja2ChatFormatter(
        template=template,
        eos_token=_text(vocab, eos),
        bos_token=_text(vocab, bos),
        stop_token_ids=[eos],
    )


def _meta(model: Any, key: str) -> str | None:
    size = 1 << 16
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, size)
        if n < 0:
            return None
        if n < size:
            return buffer.value.decode("utf-8", errors="replace")
        size = n + 1


def _text(vocab: Any, token: int) -> str:
    if token < 0:
        return ""
    return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")

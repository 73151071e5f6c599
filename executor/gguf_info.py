"""A model's shape and per-layer byte sizes, read from GGUF metadata (never the weights)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from executor.errors import ModelError

# Architectures whose sliding-window layout llama.cpp sets in code rather than reading it
# from the file (llama-model.cpp, load_hparams: hparams.set_swa_pattern(n)).
SWA_PATTERN_DEFAULTS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2, "gemma3n": 5}

_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelInfo:
    """What the offload plan needs to know about a model."""

    path: str
    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]  # per layer
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    n_swa: int  # sliding window size in tokens (0: none)
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding window
    layer_bytes: tuple[int, ...]  # per block: bytes of blk.N.* tensors
    output_bytes: int  # the output layer: output.weight (or the tied token embedding) + norm
    output_tied: bool  # no output.weight: the output layer reuses the token embedding
    token_embd_bytes: int
    largest_layer_tensor: int  # the biggest single blk.* tensor (op-offload staging)
    file_size: int
    quantization: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.token_embd_bytes

    def kv_width(self, layer: int) -> tuple[int, int]:
        """Elements per cell of this layer's K and V (KV heads × key/value length)."""
        heads = self.n_head_kv[layer]
        return heads * self.key_length, heads * self.value_length


def read_model_info(path: str | Path) -> ModelInfo:
    """Read a GGUF file's metadata and tensor table; ModelError if it is not a usable GGUF."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, IndexError) as exc:
        raise ModelError(f"{path}: cannot read GGUF metadata: {exc}") from None
    meta = _Meta(reader)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path}: no general.architecture in the GGUF metadata")
    n_layer = int(meta.require(f"{arch}.block_count", path))
    n_embd = int(meta.require(f"{arch}.embedding_length", path))
    n_head = _per_layer(meta.require(f"{arch}.attention.head_count", path), n_layer)
    n_head_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", list(n_head)), n_layer)
    head_dim = n_embd // max(n_head) if max(n_head) else 0
    key_length = int(meta.get(f"{arch}.attention.key_length", head_dim))
    value_length = int(meta.get(f"{arch}.attention.value_length", head_dim))
    n_swa = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0)

    layer_bytes = [0] * n_layer
    largest = 0
    named: dict[str, int] = {}
    vocab_from_embd = 0
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
        match = _BLOCK.match(tensor.name)
        if match and int(match[1]) < n_layer:
            layer_bytes[int(match[1])] += size
            largest = max(largest, size)
        else:
            named[tensor.name] = size
        if tensor.name == "token_embd.weight":
            vocab_from_embd = int(tensor.shape[-1])
    token_embd = named.get("token_embd.weight", 0)
    # Without output.weight the embedding is tied: llama.cpp loads token_embd a second time
    # for the output layer (TENSOR_DUPLICATED), on the output layer's device.
    output = named.get("output.weight", token_embd) + named.get("output_norm.weight", 0)
    output += named.get("output_norm.bias", 0) + named.get("output.bias", 0)

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(
        meta.get(f"{arch}.vocab_size", 0) or (len(tokens.data) if tokens else 0) or vocab_from_embd
    )
    return ModelInfo(
        path=str(path),
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=int(max(_per_layer(meta.get(f"{arch}.feed_forward_length", 0), n_layer))),
        n_vocab=n_vocab,
        n_ctx_train=int(meta.get(f"{arch}.context_length", 0) or 0),
        n_head=tuple(n_head),
        n_head_kv=tuple(n_head_kv),
        key_length=key_length,
        value_length=value_length,
        n_swa=n_swa,
        swa_layers=_swa_layers(
            meta.get(f"{arch}.attention.sliding_window_pattern"), arch, n_swa, n_layer
        ),
        layer_bytes=tuple(layer_bytes),
        output_bytes=output,
        output_tied="output.weight" not in named,
        token_embd_bytes=token_embd,
        largest_layer_tensor=largest,
        file_size=path.stat().st_size,
        quantization=_file_type(meta.get("general.file_type")),
    )


class _Meta:
    """Typed access to GGUF key/values."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self.fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field_ = self.fields.get(key)
        if field_ is None:
            return default
        return field_.contents()

    def require(self, key: str, path: Path) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelError(f"{path}: the GGUF metadata lacks {key}")
        return value


def _per_layer(value: Any, n_layer: int) -> list[int]:
    """A scalar hyperparameter for every layer, or the per-layer list as given."""
    if isinstance(value, list):
        values = [int(v) for v in value]
        return (values + values[-1:] * n_layer)[:n_layer] if values else [0] * n_layer
    return [int(value)] * n_layer


def _swa_layers(pattern: Any, arch: str, n_swa: int, n_layer: int) -> tuple[bool, ...]:
    """Which layers use the sliding window, as llama.cpp decides (hparams.set_swa_pattern)."""
    if not n_swa:
        return (False,) * n_layer
    if isinstance(pattern, list):  # newer files: one bool per layer
        flags = [bool(v) for v in pattern]
        return tuple((flags + [False] * n_layer)[:n_layer])
    period = int(pattern) if pattern else SWA_PATTERN_DEFAULTS.get(arch, 0)
    if period <= 0:  # a window with no pattern: every layer slides
        return (True,) * n_layer
    # In each period of n layers, the first n-1 slide and the last attends to everything.
    return tuple(il % period < period - 1 for il in range(n_layer))


def _file_type(value: Any) -> str:
    if value is None:
        return ""
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)

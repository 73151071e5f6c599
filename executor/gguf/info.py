"""A model's shape and its tensor table, read from GGUF metadata (never the weights).

Every tensor gets a class, from llama.cpp's tensor names, so that the plan can place them one by
one: attention (q/k/v/o, their norms, biases and sinks), dense FFN, router (`ffn_gate_inp`),
shared experts (`*_shexp`), routed experts (`ffn_{up,gate,down,gate_up}_{,ch}exps`, llama.cpp's
LLM_FFN_EXPS_REGEX), other block tensors, the output layer and the token embedding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor.errors import ModelError
from executor.gguf.header import LongArray, read_header
from executor.gguf.types import FILE_TYPES

ATTENTION = "attention"
FFN = "ffn"
ROUTER = "router"
SHARED = "shared_experts"
EXPERTS = "routed_experts"
OTHER = "other"
OUTPUT = "output"
EMBEDDING = "token_embedding"
BLOCK_CLASSES = (ATTENTION, FFN, ROUTER, SHARED, EXPERTS, OTHER)
CLASSES = (*BLOCK_CLASSES, OUTPUT, EMBEDDING)

# Architectures whose sliding-window layout llama.cpp sets in code rather than reading it from
# the file (models/*.cpp: load_swa_pattern(ml, n[, dense_first])): (period, dense first).
SWA_PATTERN_DEFAULTS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "gpt-oss": (2, False),
    "exaone4": (4, False),
    "exaone-moe": (4, False),
    "afmoe": (4, False),
    "olmo2": (4, False),
    "mellum": (4, False),
    "muse-glimmer": (4, False),
    "plamo3": (8, False),
    "smallthinker": (4, True),
    "laguna": (4, True),
}
NO_SWA_ARCHS = {"phi3"}  # llama.cpp ignores phi3's window (models/phi3.cpp)
# Recurrent and hybrid models: their state is not a KV cache and their blocks are not split by
# tensor here (llama.cpp's llm_arch_is_recurrent / is_hybrid, and the tensors that betray one).
RECURRENT_ARCHS = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba",
                   "falcon-h1", "granitehybrid", "plamo2", "lfm2", "lfm2moe", "nemotron_h",
                   "qwen3next", "qwen35", "qwen35moe", "kimi-linear"}  # fmt: skip
_RECURRENT_TENSOR = re.compile(r"\.(ssm_|time_mix|channel_mix|shortconv)")

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_EXPERTS = re.compile(r"^ffn_(up|down|gate|gate_up)_(ch|)exps")  # llama.cpp's LLM_FFN_EXPS_REGEX


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: where it belongs and how many bytes it is."""

    name: str
    block: int | None  # the repeating block, None for token_embd/output tensors
    kind: str  # one of CLASSES
    n_bytes: int

    @property
    def base(self) -> str:
        """`ffn_up_exps` for `blk.3.ffn_up_exps.weight` (what a placement rule names)."""
        rest = _BLOCK.match(self.name)
        return (rest[2] if rest else self.name).split(".")[0]


def classify(name: str) -> tuple[int | None, str]:
    """(block, class) of a tensor by its llama.cpp name."""
    match = _BLOCK.match(name)
    if match is None:
        if name.startswith("token_embd"):
            return None, EMBEDDING
        return None, OUTPUT  # output.weight, output_norm.*, and other top-level tensors
    rest = match[2]
    if _EXPERTS.match(rest):
        kind = EXPERTS
    elif "shexp" in rest:
        kind = SHARED
    elif rest.startswith(("ffn_gate_inp", "exp_probs_b")):
        kind = ROUTER
    elif rest.startswith("attn") or "attention" in rest:
        kind = ATTENTION
    elif rest.startswith(("ffn", "post_ffw")):
        kind = FFN
    else:
        kind = OTHER
    return int(match[1]), kind


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
    tensors: tuple[TensorInfo, ...]
    output_tied: bool  # no output.weight: the output layer reuses the token embedding
    file_size: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    recurrent: bool = False  # recurrent or hybrid: planned by layers, its state is not a KV cache
    quantization: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def moe(self) -> bool:
        return any(t.kind == EXPERTS for t in self.tensors)

    @property
    def layer_bytes(self) -> tuple[int, ...]:
        """Bytes of each repeating block (all of its tensors)."""
        sizes = [0] * self.n_layer
        for t in self.tensors:
            if t.block is not None:
                sizes[t.block] += t.n_bytes
        return tuple(sizes)

    @property
    def token_embd_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors if t.kind == EMBEDDING)

    @property
    def output_bytes(self) -> int:
        """The output layer; a tied one is a copy of the token embedding (TENSOR_DUPLICATED)."""
        tied = self.token_embd_bytes if self.output_tied else 0
        return sum(t.n_bytes for t in self.tensors if t.kind == OUTPUT) + tied

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.token_embd_bytes

    def kv_width(self, layer: int) -> tuple[int, int]:
        """Elements per cell of this layer's K and V (KV heads × key/value length)."""
        heads = self.n_head_kv[layer]
        return heads * self.key_length, heads * self.value_length

    def class_bytes(self) -> dict[str, int]:
        """Bytes per tensor class (the tied output counted as the copy llama.cpp loads)."""
        sums = dict.fromkeys(CLASSES, 0)
        for t in self.tensors:
            sums[t.kind] += t.n_bytes
        sums[OUTPUT] = self.output_bytes
        return sums


def read_model_info(path: str | Path) -> ModelInfo:
    """Read a GGUF file's metadata and tensor table; ModelError if it is not a usable GGUF."""
    path = Path(path)
    header = read_header(path)
    meta = _Meta(header.fields, path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path}: no general.architecture in the GGUF metadata")
    n_layer = int(meta.require(f"{arch}.block_count"))
    n_embd = int(meta.require(f"{arch}.embedding_length"))
    n_head = _per_layer(meta.get(f"{arch}.attention.head_count", 0), n_layer)
    n_head_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", list(n_head)), n_layer)
    head_dim = n_embd // max(n_head) if max(n_head) else 0
    key_length = int(meta.get(f"{arch}.attention.key_length", head_dim))
    value_length = int(meta.get(f"{arch}.attention.value_length", head_dim))
    window = meta.get(f"{arch}.attention.sliding_window", 0) or 0
    n_swa = 0 if arch in NO_SWA_ARCHS else int(window)

    tensors = []
    vocab_from_embd = 0
    for tensor in header.tensors:
        block, kind = classify(tensor.name)
        if block is not None and block >= n_layer:
            block, kind = None, OUTPUT  # e.g. next-token-prediction layers past the last block
        tensors.append(TensorInfo(tensor.name, block, kind, tensor.n_bytes))
        if tensor.name == "token_embd.weight" and len(tensor.shape) >= 2:
            vocab_from_embd = int(tensor.shape[1])
    names = {t.name for t in tensors}

    tokens = header.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(
        meta.get(f"{arch}.vocab_size", 0) or (len(tokens) if tokens else 0) or vocab_from_embd
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
        tensors=tuple(tensors),
        output_tied="output.weight" not in names,
        file_size=header.file_size,
        n_expert=int(meta.get(f"{arch}.expert_count", 0) or 0),
        n_expert_used=int(max(_per_layer(meta.get(f"{arch}.expert_used_count", 0), n_layer))),
        n_ff_exp=int(max(_per_layer(meta.get(f"{arch}.expert_feed_forward_length", 0), n_layer))),
        recurrent=arch in RECURRENT_ARCHS or any(_RECURRENT_TENSOR.search(n) for n in names),
        quantization=_file_type(meta.get("general.file_type")),
    )


class _Meta:
    """Typed access to GGUF key/values, with errors that name the file and the key."""

    def __init__(self, fields: dict[str, Any], path: Path) -> None:
        self.fields = fields
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(key, default)
        if isinstance(value, LongArray):
            raise ModelError(f"{self.path}: {key} is an array of {value.count}, unexpected")
        return value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelError(f"{self.path}: the GGUF metadata lacks {key}")
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ModelError(f"{self.path}: {key} is {value!r}, not a positive number")
        return value


def _per_layer(value: Any, n_layer: int) -> list[int]:
    """A scalar hyperparameter for every layer, or the per-layer list as given."""
    if isinstance(value, LongArray):
        raise ModelError(f"a per-layer list of {value.count} entries for {n_layer} layers")
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
    period, dense_first = SWA_PATTERN_DEFAULTS.get(arch, (0, False))
    if pattern:
        period = int(pattern)
    if period <= 0:  # a window with no pattern: every layer slides
        return (True,) * n_layer
    if dense_first:  # the first layer of each period attends to everything
        return tuple(il % period != 0 for il in range(n_layer))
    # In each period of n layers, the first n-1 slide and the last attends to everything.
    return tuple(il % period < period - 1 for il in range(n_layer))


def _file_type(value: Any) -> str:
    if value is None:
        return ""
    try:
        return FILE_TYPES.get(int(value), str(value))
    except (TypeError, ValueError):
        return str(value)

"""GGUF files written with the `gguf` package, for tests and benchmarks that must not need a
model hub.

Two kinds of file:
- headers with a sparse data region (`random=False`): any shape, a real tensor table, and
  weights that read as zeros. A 63 GB gpt-oss-120b-shaped file costs a few megabytes of disk;
  llama.cpp loads it (dry runs, memory on a GPU) and even decodes it (zeros decode fine).
- small models with random weights (`random=True`, F32/F16 tensors) that llama.cpp really runs:
  a tiny mixture-of-experts model, a tiny sliding-window model. They carry the default model's
  tokenizer (and chat template), so prompts tokenize as they would for SmolLM2.

Shapes: llama (7B/13B/70B and Llama-3.3-70B-like), qwen3moe (Qwen3-30B-A3B-like, tiny),
gpt-oss (gpt-oss-120b-like, tiny).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType
Tensor = tuple[str, tuple[int, ...], Q]  # name, shape in ggml order [ne0, ne1, ...], type


@dataclass(frozen=True)
class Shape:
    """A llama-architecture shape (dense)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int = 32000
    n_ctx_train: int = 4096


SHAPES = {
    "tiny": Shape(n_layer=4, n_embd=256, n_ff=688, n_head=4, n_head_kv=4, n_vocab=1024),
    # 29 blocks (30 layers with the output), about 1 GB: quick to hash, big enough to plan.
    "1b": Shape(n_layer=29, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=4),
    "7b": Shape(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32),
    "13b": Shape(n_layer=40, n_embd=5120, n_ff=13824, n_head=40, n_head_kv=40),
    "70b": Shape(n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8),
    # Llama-3.3-70B: the 70B body with Llama 3's 128,256-token vocabulary and 128k context.
    "llama3-70b": Shape(80, 8192, 28672, 64, 8, n_vocab=128256, n_ctx_train=131072),
}


@dataclass(frozen=True)
class MoeShape:
    """A mixture-of-experts shape (qwen3moe or gpt-oss)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int = 0  # sliding window (gpt-oss: every other layer)
    dense: Q = Q.Q8_0  # attention and the other dense weights
    experts: Q = Q.MXFP4
    down: Q | None = None  # ffn_down_exps, if not `experts`
    embd: Q = Q.Q8_0
    output: Q = Q.Q8_0


MOE_SHAPES = {
    # gpt-oss-120b as ggml-org publishes it: MXFP4 experts, Q8_0 dense weights, ~63 GB.
    "gpt-oss-120b": MoeShape(
        "gpt-oss", n_layer=36, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64, n_expert=128,
        n_expert_used=4, n_ff_exp=2880, n_vocab=201088, n_ctx_train=131072, n_swa=128,
    ),
    # Qwen3-30B-A3B at Q4_K_M (experts Q4_K, ffn_down_exps Q6_K), ~17 GB.
    "qwen3-30b-a3b": MoeShape(
        "qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128,
        n_expert=128, n_expert_used=8, n_ff_exp=768, n_vocab=151936, n_ctx_train=40960,
        dense=Q.Q4_K, experts=Q.Q4_K, down=Q.Q6_K, embd=Q.Q4_K, output=Q.Q6_K,
    ),
    # A small gpt-oss-like header (about 720 MB, quick to hash) for the worker's tests.
    "small-moe": MoeShape(
        "gpt-oss", n_layer=12, n_embd=1024, n_head=16, n_head_kv=4, head_dim=64, n_expert=32,
        n_expert_used=4, n_ff_exp=1024, n_vocab=32000, n_ctx_train=8192, n_swa=128,
    ),
    # Tiny models with random weights that run on the CPU in a moment.
    "tiny-qwen3moe": MoeShape(
        "qwen3moe", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_expert=8,
        n_expert_used=2, n_ff_exp=32, n_vocab=0, n_ctx_train=32768,
        dense=Q.F32, experts=Q.F32, embd=Q.F16, output=Q.F16,
    ),
    "tiny-gpt-oss": MoeShape(
        "gpt-oss", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_expert=4,
        n_expert_used=2, n_ff_exp=64, n_vocab=0, n_ctx_train=32768, n_swa=32,
        dense=Q.F32, experts=Q.F32, embd=Q.F16, output=Q.F16,
    ),
}  # fmt: skip
# n_vocab 0: the vocabulary (and chat template) of the default model, SmolLM2's 49,152 tokens.


def tensor_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    elements = int(np.prod(shape))
    assert elements % block == 0, (shape, qtype)
    return elements // block * size


# --- tensor tables ------------------------------------------------------------------------------


def q4_k_m_types(layer: int, n_layer: int) -> tuple[Q, Q]:
    """(attn_v, ffn_down) types as llama.cpp's Q4_K_M recipe picks them (use_more_bits)."""
    more = layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2
    return (Q.Q6_K, Q.Q6_K) if more else (Q.Q4_K, Q.Q4_K)


def tensor_table(s: Shape, quant: str) -> list[Tensor]:
    """Every tensor of a llama model: Q4_K_M, Q5_K_M (attn_v/ffn_down Q6_K where Q4_K_M takes
    them up a step, Q5_K elsewhere) or F16."""
    head_dim = s.n_embd // s.n_head
    kv = s.n_head_kv * head_dim
    big = {"F16": Q.F16, "Q4_K_M": Q.Q4_K, "Q5_K_M": Q.Q5_K}[quant]
    table = [("token_embd.weight", (s.n_embd, s.n_vocab), big)]
    for i in range(s.n_layer):
        v_type, down_type = (big, big) if quant == "F16" else q4_k_m_types(i, s.n_layer)
        if quant == "Q5_K_M":
            v_type = down_type = Q.Q6_K if v_type == Q.Q6_K else Q.Q5_K
        table += [
            (f"blk.{i}.attn_norm.weight", (s.n_embd,), Q.F32),
            (f"blk.{i}.attn_q.weight", (s.n_embd, s.n_embd), big),
            (f"blk.{i}.attn_k.weight", (s.n_embd, kv), big),
            (f"blk.{i}.attn_v.weight", (s.n_embd, kv), v_type),
            (f"blk.{i}.attn_output.weight", (s.n_embd, s.n_embd), big),
            (f"blk.{i}.ffn_norm.weight", (s.n_embd,), Q.F32),
            (f"blk.{i}.ffn_gate.weight", (s.n_embd, s.n_ff), big),
            (f"blk.{i}.ffn_up.weight", (s.n_embd, s.n_ff), big),
            (f"blk.{i}.ffn_down.weight", (s.n_ff, s.n_embd), down_type),
        ]
    table += [
        ("output_norm.weight", (s.n_embd,), Q.F32),
        ("output.weight", (s.n_embd, s.n_vocab), Q.F16 if quant == "F16" else Q.Q6_K),
    ]
    return table


def moe_tensor_table(s: MoeShape, n_vocab: int) -> list[Tensor]:
    """Every tensor of a qwen3moe or gpt-oss model, as llama.cpp creates them."""
    q_width, kv_width = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    experts = (s.n_embd, s.n_ff_exp, s.n_expert)
    down = (s.n_ff_exp, s.n_embd, s.n_expert)
    table: list[Tensor] = [("token_embd.weight", (s.n_embd, n_vocab), s.embd)]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        table += [
            (b + "attn_norm.weight", (s.n_embd,), Q.F32),
            (b + "attn_q.weight", (s.n_embd, q_width), s.dense),
            (b + "attn_k.weight", (s.n_embd, kv_width), s.dense),
            (b + "attn_v.weight", (s.n_embd, kv_width), s.dense),
            (b + "attn_output.weight", (q_width, s.n_embd), s.dense),
            (b + "ffn_gate_inp.weight", (s.n_embd, s.n_expert), Q.F32),
            (b + "ffn_gate_exps.weight", experts, s.experts),
            (b + "ffn_up_exps.weight", experts, s.experts),
            (b + "ffn_down_exps.weight", down, s.down or s.experts),
        ]
        if s.arch == "gpt-oss":
            table += [
                (b + "post_attention_norm.weight", (s.n_embd,), Q.F32),
                (b + "attn_q.bias", (q_width,), Q.F32),
                (b + "attn_k.bias", (kv_width,), Q.F32),
                (b + "attn_v.bias", (kv_width,), Q.F32),
                (b + "attn_output.bias", (s.n_embd,), Q.F32),
                (b + "attn_sinks.weight", (s.n_head,), Q.F32),
                (b + "ffn_gate_inp.bias", (s.n_expert,), Q.F32),
                (b + "ffn_gate_exps.bias", (s.n_ff_exp, s.n_expert), Q.F32),
                (b + "ffn_up_exps.bias", (s.n_ff_exp, s.n_expert), Q.F32),
                (b + "ffn_down_exps.bias", (s.n_embd, s.n_expert), Q.F32),
            ]
        else:
            table += [
                (b + "attn_q_norm.weight", (s.head_dim,), Q.F32),
                (b + "attn_k_norm.weight", (s.head_dim,), Q.F32),
                (b + "ffn_norm.weight", (s.n_embd,), Q.F32),
            ]
    table.append(("output_norm.weight", (s.n_embd,), Q.F32))
    table.append(("output.weight", (s.n_embd, n_vocab), s.output))
    return table


# --- writing ------------------------------------------------------------------------------------


@dataclass
class Spec:
    """What to write: architecture, key/values (without the arch prefix), tensors, vocab."""

    arch: str
    name: str
    kv: dict[str, Any]
    tensors: list[Tensor]
    file_type: gguf.LlamaFileType | None = None
    tokenizer: str = "default"  # "default": the default model's; "spm": filler tokens
    n_vocab: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # full keys (no arch prefix added)


def write(path: Path, spec: Spec, *, random: bool = False, seed: int = 0) -> Path:
    """Write `spec` to `path`: sparse zeros, or random weights (F32/F16 tensors only)."""
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name(spec.name)
    for key, value in spec.kv.items():
        _add(writer, f"{spec.arch}.{key}", value)
    for key, value in spec.extra.items():
        _add(writer, key, value)
    if spec.file_type is not None:
        writer.add_file_type(spec.file_type)
    if spec.tokenizer == "default":
        _copy_default_tokenizer(writer, skip=set(spec.extra))
    else:
        _add_spm_vocab(writer, spec.n_vocab)
    if random:
        rng = np.random.default_rng(seed)
        for name, ne, qtype in spec.tensors:
            writer.add_tensor(name, _random_tensor(rng, name, ne, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path
    for name, ne, qtype in spec.tensors:
        # gguf-py takes numpy order (reversed ggml order) and the byte count.
        writer.add_tensor_info(
            name,
            tuple(reversed(ne)),
            np.dtype(np.float32),
            tensor_bytes(ne, qtype),
            raw_dtype=qtype,
        )
    writer.open_output_file()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    data_start = fout.tell()
    data = sum(
        writer.ggml_pad(ti.nbytes, writer.data_alignment) for ti in writer.tensors[0].values()
    )
    fout.truncate(data_start + data)  # sparse: no disk blocks behind the weights
    writer.close()
    return path


def _random_tensor(rng: np.random.Generator, name: str, ne: tuple[int, ...], qtype: Q) -> Any:
    shape = tuple(reversed(ne))
    dtype = {Q.F32: np.float32, Q.F16: np.float16}[qtype]
    if "norm" in name:
        return np.ones(shape, dtype)  # RMS norm weights: 1
    if name.endswith(".bias") or "sinks" in name:
        return np.zeros(shape, dtype)
    return (rng.standard_normal(shape) * 0.05).astype(dtype)


def _add(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"{key}: {value!r}")


_DEFAULT_TOKENIZER: list[tuple[str, Any, VT, VT | None]] | None = None


def default_tokenizer() -> list[tuple[str, Any, VT, VT | None]]:
    """The default model's tokenizer.* key/values (read once)."""
    global _DEFAULT_TOKENIZER
    if _DEFAULT_TOKENIZER is None:
        from executor.gguf.models import resolve_model

        reader = gguf.GGUFReader(str(resolve_model(None)))
        values = []
        for name, f in reader.fields.items():
            if name.startswith("tokenizer."):
                sub = f.types[1] if f.types[0] == VT.ARRAY else None
                values.append((name, f.contents(), f.types[0], sub))
        _DEFAULT_TOKENIZER = values
    return _DEFAULT_TOKENIZER


def default_vocab_size() -> int:
    return next(len(v) for k, v, *_ in default_tokenizer() if k == "tokenizer.ggml.tokens")


def _copy_default_tokenizer(writer: gguf.GGUFWriter, skip: set[str]) -> None:
    for name, value, vtype, sub in default_tokenizer():
        if name not in skip:
            writer.add_key_value(name, value, vtype, sub_type=sub)


def _add_spm_vocab(writer: gguf.GGUFWriter, n_vocab: int) -> None:
    """A SentencePiece-style vocabulary: unk, bos, eos, the 256 byte tokens, then fillers."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [f"▁t{i}" for i in range(n_vocab - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


# --- the shapes as files ------------------------------------------------------------------------


def write_llama_gguf(path: Path, shape: Shape | str, *, quant: str = "Q4_K_M") -> Path:
    """A loadable llama GGUF with this shape; the weights are a sparse (all-zero) region."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    file_type = {
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        "Q5_K_M": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    }[quant]
    kv = {
        "context_length": s.n_ctx_train,
        "embedding_length": s.n_embd,
        "block_count": s.n_layer,
        "feed_forward_length": s.n_ff,
        "attention.head_count": s.n_head,
        "attention.head_count_kv": s.n_head_kv,
        "rope.dimension_count": s.n_embd // s.n_head,
        "attention.layer_norm_rms_epsilon": 1e-5,
    }
    name = f"synthetic-llama-{s.n_layer}L-{s.n_embd}"
    spec = Spec("llama", name, kv, tensor_table(s, quant), file_type, "spm", s.n_vocab)
    return write(path, spec)


def moe_spec(s: MoeShape) -> Spec:
    """The key/values and tensors of a MoE shape."""
    n_vocab = s.n_vocab or default_vocab_size()
    kv: dict[str, Any] = {
        "context_length": s.n_ctx_train,
        "embedding_length": s.n_embd,
        "block_count": s.n_layer,
        "feed_forward_length": s.n_ff_exp,
        "expert_feed_forward_length": s.n_ff_exp,
        "expert_count": s.n_expert,
        "expert_used_count": s.n_expert_used,
        "attention.head_count": s.n_head,
        "attention.head_count_kv": s.n_head_kv,
        "attention.key_length": s.head_dim,
        "attention.value_length": s.head_dim,
        "rope.dimension_count": s.head_dim,
        "rope.freq_base": 150000.0 if s.arch == "gpt-oss" else 1000000.0,
        "attention.layer_norm_rms_epsilon": 1e-5 if s.arch == "gpt-oss" else 1e-6,
    }
    if s.n_swa:
        kv["attention.sliding_window"] = s.n_swa
    tokenizer = "default" if not s.n_vocab else "spm"
    file_type = {
        Q.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
        Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
    }.get(s.experts)
    name = f"synthetic-{s.arch}-{s.n_layer}L"
    return Spec(s.arch, name, kv, moe_tensor_table(s, n_vocab), file_type, tokenizer, n_vocab)


def write_moe_gguf(
    path: Path,
    shape: MoeShape | str,
    *,
    random: bool | None = None,
    chat_template: str | None = None,
) -> Path:
    """A MoE model: sparse for the big shapes, random weights for the tiny ones; with
    `chat_template`, that template instead of the default model's."""
    s = MOE_SHAPES[shape] if isinstance(shape, str) else shape
    tiny = s.experts in (Q.F32, Q.F16)
    spec = moe_spec(s)
    if chat_template is not None:
        spec.extra["tokenizer.chat_template"] = chat_template
    return write(path, spec, random=tiny if random is None else random)


def write_tiny_gguf(path: Path) -> Path:
    """A small, valid llama GGUF (for the fake engine and quick checks)."""
    return write_llama_gguf(path, "tiny", quant="F16")


def names(table: Iterable[Tensor]) -> list[str]:
    return [name for name, _, _ in table]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a synthetic GGUF (sparse or random).")
    parser.add_argument("path", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES) + sorted(MOE_SHAPES), default="70b")
    parser.add_argument("--quant", choices=["Q4_K_M", "Q5_K_M", "F16"], default="Q4_K_M")
    args = parser.parse_args()
    if args.shape in MOE_SHAPES:
        write_moe_gguf(args.path, args.shape)
    else:
        write_llama_gguf(args.path, args.shape, quant=args.quant)
    print(args.path)

"""GGUF files written with the `gguf` package, for tests that must not need real weights.

`write_llama_gguf` writes a llama-architecture model of any shape (Llama-2-7B/13B/70B-like)
with a real tensor table and tokenizer, and leaves the data region sparse: a 41 GB 70B file
takes a few megabytes of disk. llama.cpp loads it (the weights read as zeros), which is enough
for its dry run and for measuring memory on a GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Shape:
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
}


def tensor_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    elements = int(np.prod(shape))
    assert elements % block == 0, (shape, qtype)
    return elements // block * size


def q4_k_m_types(layer: int, n_layer: int) -> tuple[Q, Q]:
    """(attn_v, ffn_down) types as llama.cpp's Q4_K_M recipe picks them (use_more_bits)."""
    more = layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2
    return (Q.Q6_K, Q.Q6_K) if more else (Q.Q4_K, Q.Q4_K)


def tensor_table(s: Shape, quant: str) -> list[tuple[str, tuple[int, ...], Q]]:
    """(name, shape in ggml order [ne0, ne1], type) for every tensor of a llama model."""
    head_dim = s.n_embd // s.n_head
    kv = s.n_head_kv * head_dim
    big = Q.F16 if quant == "F16" else Q.Q4_K
    table = [("token_embd.weight", (s.n_embd, s.n_vocab), big)]
    for i in range(s.n_layer):
        v_type, down_type = (big, big) if quant == "F16" else q4_k_m_types(i, s.n_layer)
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


def write_llama_gguf(path: Path, shape: Shape | str, *, quant: str = "Q4_K_M") -> Path:
    """A loadable llama GGUF with this shape; the weights are a sparse (all-zero) region."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"synthetic-llama-{s.n_layer}L-{s.n_embd}")
    writer.add_context_length(s.n_ctx_train)
    writer.add_embedding_length(s.n_embd)
    writer.add_block_count(s.n_layer)
    writer.add_feed_forward_length(s.n_ff)
    writer.add_head_count(s.n_head)
    writer.add_head_count_kv(s.n_head_kv)
    writer.add_rope_dimension_count(s.n_embd // s.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if quant == "F16" else gguf.LlamaFileType.MOSTLY_Q4_K_M
    )
    _add_spm_vocab(writer, s.n_vocab)
    for name, ne, qtype in tensor_table(s, quant):
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


def write_tiny_gguf(path: Path) -> Path:
    """A small, valid llama GGUF (for the fake engine and quick checks)."""
    return write_llama_gguf(path, "tiny", quant="F16")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a sparse synthetic llama GGUF.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    parser.add_argument("--quant", choices=["Q4_K_M", "F16"], default="Q4_K_M")
    args = parser.parse_args()
    write_llama_gguf(args.path, args.shape, quant=args.quant)
    print(args.path)

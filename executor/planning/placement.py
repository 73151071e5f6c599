"""Where each tensor goes, in llama.cpp's own terms: `-ngl` and `-ot` rules. Pure functions.

A Placement says:
- `n_gpu_layers` (llama.cpp's -ngl = k): the output layer and the last k-1 blocks are GPU
  layers (their KV cache is on the GPU too); the token embedding always stays in RAM;
- `cpu_experts` (MoE): the lowest `cpu_experts` GPU blocks keep their routed experts
  (`ffn_{up,gate,down,gate_up}_{,ch}exps`) in RAM, so the experts on the GPU are those of the
  last blocks, as llama.cpp's own `--n-cpu-moe N` puts them;
- `partial_block` / `partial_cpu`: one more block split by tensor: for a MoE model the block
  above the RAM-expert run, with only `partial_cpu` of its expert tensors in RAM; for a dense
  model the lowest GPU block, with `partial_cpu` of its FFN matrices in RAM.

`rules()` turns that into `-ot` rules ("<regex>=CPU", applied by llama.cpp with
std::regex_search, the first match deciding), and `assign()` applies rules exactly that way, so
the plan's byte counts are those of llama.cpp with the same flags.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from executor.gguf.info import EXPERTS, FFN, ModelInfo, TensorInfo

EXPERT_PATTERN = r"ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp's LLM_FFN_EXPS_REGEX
# The tensors a partial block moves to RAM first, in that order (llama.cpp's fit does the same:
# down goes first, then gate; up stays longest): the last entry stays on the GPU longest.
EXPERT_ORDER = ("ffn_down_exps", "ffn_down_chexps", "ffn_gate_exps", "ffn_gate_chexps",
                "ffn_gate_up_exps", "ffn_up_exps", "ffn_up_chexps")  # fmt: skip
DENSE_ORDER = ("ffn_down", "ffn_gate", "ffn_up")


@dataclass(frozen=True)
class Placement:
    """A layout of the model over GPU and RAM (see the module docstring)."""

    n_gpu_layers: int
    cpu_experts: int = 0
    partial_block: int | None = None
    partial_cpu: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "cpu_experts": self.cpu_experts,
            "partial_block": self.partial_block,
            "partial_cpu": list(self.partial_cpu),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Placement:
        return cls(
            n_gpu_layers=int(data["n_gpu_layers"]),  # type: ignore[arg-type]
            cpu_experts=int(data.get("cpu_experts") or 0),  # type: ignore[arg-type]
            partial_block=data.get("partial_block"),  # type: ignore[arg-type]
            partial_cpu=tuple(data.get("partial_cpu") or ()),  # type: ignore[arg-type]
        )


def first_gpu_block(model: ModelInfo, n_gpu_layers: int) -> int:
    """The lowest block on the GPU when llama.cpp's n_gpu_layers is k (n_layer: none)."""
    k = max(0, min(n_gpu_layers, model.n_layer + 1))
    return model.n_layer - max(k - 1, 0)


def rules(model: ModelInfo, p: Placement) -> tuple[str, ...]:
    """The `-ot` rules ("<regex>=CPU") that, with `-ngl p.n_gpu_layers`, give this placement.

    No commas: llama.cpp splits an -ot value at commas."""
    out = []
    first = first_gpu_block(model, p.n_gpu_layers)
    if p.partial_block is not None and p.partial_cpu:
        names = "|".join(sorted(p.partial_cpu))
        suffix = "" if any("exps" in n for n in p.partial_cpu) else r"\."
        out.append(rf"blk\.{p.partial_block}\.({names}){suffix}=CPU")
    if p.cpu_experts > 0:
        blocks = int_range_regex(first, first + p.cpu_experts - 1)
        out.append(rf"blk\.({blocks})\.{EXPERT_PATTERN}=CPU")
    return tuple(out)


def assign(model: ModelInfo, n_gpu_layers: int, overrides: tuple[str, ...]) -> dict[str, bool]:
    """Tensor name → on the GPU, as llama.cpp decides it: the layer's device by n_gpu_layers,
    then the first `-ot` rule whose regex is found in the name (only "=CPU" rules here)."""
    first = first_gpu_block(model, n_gpu_layers)
    output_on_gpu = n_gpu_layers >= 1
    compiled = [(re.compile(r.rsplit("=", 1)[0]), r.rsplit("=", 1)[1]) for r in overrides]
    placed = {}
    for t in model.tensors:
        on_gpu = output_on_gpu if t.block is None else t.block >= first
        if t.kind == "token_embedding":
            on_gpu = False
        for pattern, buft in compiled:
            if pattern.search(t.name):
                on_gpu = buft != "CPU"
                break
        placed[t.name] = on_gpu
    return placed


def int_range_regex(lo: int, hi: int) -> str:
    """A regex (no anchors, no commas) that matches exactly the decimal numbers lo…hi.

    >>> int_range_regex(0, 30)
    '\\\\d|[12]\\\\d|30'
    """
    if lo > hi:
        raise ValueError(f"empty range {lo}..{hi}")
    parts: list[str] = []
    for a, b in _split_range(lo, hi):
        parts.append(_same_length_regex(str(a), str(b)))
    return "|".join(parts)


def _split_range(lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """Split lo..hi into ranges whose ends have the same number of digits."""
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)
        yield lo, top
        lo = top + 1


def _same_length_regex(a: str, b: str) -> str:
    """Regex alternatives for the numbers a..b of the same length."""
    if a == b:
        return a
    if len(a) == 1:
        return _digit(a, b)
    if a[0] == b[0]:
        inner = _same_length_regex(a[1:], b[1:])
        return f"{a[0]}({inner})" if "|" in inner else a[0] + inner
    parts = []
    low_tail_full = set(a[1:]) == {"0"}
    high_tail_full = set(b[1:]) == {"9"}
    start, end = int(a[0]), int(b[0])
    if not low_tail_full:
        parts.append(_same_length_regex(a, a[0] + "9" * (len(a) - 1)))
        start += 1
    if not high_tail_full:
        end -= 1
    if start <= end:
        parts.append(_digit(str(start), str(end)) + r"\d" * (len(a) - 1))
    if not high_tail_full:
        parts.append(_same_length_regex(b[0] + "0" * (len(b) - 1), b))
    return "|".join(parts)


def _digit(a: str, b: str) -> str:
    if a == b:
        return a
    if (a, b) == ("0", "9"):
        return r"\d"
    return f"[{a}-{b}]" if int(b) - int(a) > 1 else f"[{a}{b}]"


# --- the candidates, most GPU first ----------------------------------------------------------


def movable(model: ModelInfo, block: int) -> dict[str, int]:
    """The tensors of a block a partial placement may send to RAM: base → bytes."""
    kind = EXPERTS if model.moe else FFN
    order = EXPERT_ORDER if model.moe else DENSE_ORDER
    sizes: dict[str, int] = {}
    for t in _block_tensors(model, block):
        if t.kind == kind and t.base in order:
            sizes[t.base] = sizes.get(t.base, 0) + t.n_bytes
    return dict(sorted(sizes.items(), key=lambda item: order.index(item[0])))


def _block_tensors(model: ModelInfo, block: int) -> list[TensorInfo]:
    return [t for t in model.tensors if t.block == block]


def candidates(model: ModelInfo, by_tensor: bool) -> Iterator[Placement]:
    """Every placement the planner considers, from the most on the GPU to nothing.

    MoE (by tensor): everything; then routed experts of the lowest blocks to RAM one block at
    a time (each block first partly: down, then gate, then the rest); when every block's
    experts are in RAM, whole blocks leave the GPU from the lowest up (their dense parts).
    Dense (or by layer): whole layers from the lowest up, each first partly (its FFN matrices:
    down, then gate, then up) when placing by tensor.
    """
    n = model.n_layer
    if model.moe and by_tensor:
        yield Placement(n + 1)
        for c in range(1, n + 1):
            block = c - 1  # with all n blocks on the GPU, the first GPU block is 0
            bases = list(movable(model, block))
            for i in range(1, len(bases)):
                yield Placement(n + 1, c - 1, block, tuple(bases[:i]))
            yield Placement(n + 1, c)
        for k in range(n, -1, -1):
            yield Placement(k, max(k - 1, 0))
        return
    for k in range(n + 1, -1, -1):
        yield Placement(k)
        if not by_tensor or k == 0 or k == 1:
            continue
        block = first_gpu_block(model, k)
        bases = list(movable(model, block))
        for i in range(1, len(bases) + 1):
            yield Placement(k, 0, block, tuple(bases[:i]))

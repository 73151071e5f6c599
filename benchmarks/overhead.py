"""Overhead of executor over a plain llama-cpp-python loop, same prompts, same machine, one run.

    .venv/bin/python benchmarks/overhead.py [--prompts 32] [--max-tokens 128] [--rounds 2]

(a) plain loop: one `Llama`, `create_chat_completion` per prompt, greedy;
(b) executor at parallel 1: `submit` → `run --until-empty --parallel 1` → `export`.

Both rates are completion tokens per second of generation time: for (a) from the first call to
the end of the last, for (b) from the job's first claim to its last checkpoint (the model load
is excluded from both; it is reported separately). Rounds alternate (a, b, a, b) so that drift
of the machine shows up as spread, not as bias. Prints the ratio b/a (target >= 0.97).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import executor_run  # noqa: E402
from executor.models import resolve_model  # noqa: E402

TOPICS = [
    "the sea",
    "a lighthouse",
    "bread",
    "rain",
    "mountains",
    "a library",
    "trains",
    "the moon",
    "bees",
    "winter",
    "a market",
    "clocks",
    "rivers",
    "owls",
    "glass",
    "a garden",
]


def prompt_rows(n: int, max_tokens: int) -> list[dict]:
    return [
        {
            "custom_id": f"b{i}",
            "max_tokens": max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]} "
                    f"(variation {i}).",
                }
            ],
        }
        for i in range(n)
    ]


def plain_loop(model: Path, rows: list[dict], ctx: int) -> dict:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=str(model), n_ctx=ctx, n_batch=512, seed=0, verbose=False)
    load_s = time.perf_counter() - started
    tokens = 0
    t0 = time.perf_counter()
    for row in rows:
        out = llm.create_chat_completion(
            messages=row["messages"],
            max_tokens=row["max_tokens"],
            temperature=0.0,
            top_p=1.0,
            seed=0,
        )
        tokens += out["usage"]["completion_tokens"]
    gen_s = time.perf_counter() - t0
    llm.close()
    return {"tokens": tokens, "gen_s": gen_s, "load_s": load_s, "tok_s": tokens / gen_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args()
    model = resolve_model(os.environ.get("EXECUTOR_MODEL"))
    rows = prompt_rows(args.prompts, args.max_tokens)
    print(
        f"model {model.name}, {args.prompts} prompts, max_tokens {args.max_tokens}, "
        f"ctx {args.ctx}, greedy, {os.cpu_count()} CPUs"
    )
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            a = plain_loop(model, rows, args.ctx)
            b = executor_run(rows, Path(tmp), parallel=1, ctx=args.ctx)
            plain.append(a)
            ours.append(b)
            print(
                f"round {rnd}: plain loop {a['tok_s']:6.1f} tok/s ({a['tokens']} tokens in "
                f"{a['gen_s']:.1f}s) | executor {b['tok_s']:6.1f} tok/s ({b['tokens']} tokens "
                f"in {b['seconds']:.1f}s; {b['wall_s']:.1f}s with start-up and load) | "
                f"ratio {b['tok_s'] / a['tok_s']:.3f}"
            )
    ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(plain, ours, strict=True)]
    print(
        f"executor / plain loop: mean {statistics.mean(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); target >= 0.97"
    )


if __name__ == "__main__":
    main()

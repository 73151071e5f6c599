"""The strongest plain loop a user writes: one `Llama`, one call per prompt, greedy.

    python benchmarks/plain_loop.py MODEL ROWS.jsonl --threads N [--ctx 2048]

Threads: N for single-token steps and for prompt batches alike (llama-cpp-python's defaults
are cpu_count // 2 and cpu_count; one per physical core is what llama.cpp's own tools use and
what a user who tunes it sets). Lines with `messages` go through create_chat_completion (the
model's own chat template), lines with `prompt` through create_completion. Prints one JSON
line: completion tokens, load and generation seconds. The benchmarks time the whole process
from outside, as a user's `time python loop.py` would.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("rows")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()
    started = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(
        model_path=args.model,
        n_ctx=args.ctx,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        seed=0,
        verbose=False,
    )
    loaded = time.perf_counter()
    tokens = 0
    with open(args.rows, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        common = dict(max_tokens=row["max_tokens"], temperature=0.0, top_p=1.0, seed=0)
        if "messages" in row:
            out = llm.create_chat_completion(messages=row["messages"], **common)
        else:
            out = llm.create_completion(prompt=row["prompt"], **common)
        tokens += out["usage"]["completion_tokens"]
    done = time.perf_counter()
    llm.close()
    print(json.dumps({"tokens": tokens, "load_s": loaded - started, "gen_s": done - loaded}))


if __name__ == "__main__":
    main()

"""Sliding-window caches: swa_full (every position kept) against the window only, on a model
with sliding-window layers (a tiny gpt-oss with random weights, window 32), on work that
shares a long system prompt. Prints KV memory (plan and llama.cpp), prompt tokens computed
vs taken from the cache, and tokens/s, for both settings and the ratios.

    .venv/bin/python benchmarks/swa.py [--prompts 32] [--parallel 4] [--system-words 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.engine.llama import LlamaEngine  # noqa: E402
from executor.engine.llama_setup import dry_run  # noqa: E402
from executor.engine.protocol import LoadSpec  # noqa: E402
from executor.gguf.info import read_model_info  # noqa: E402
from executor.params import GenerationRequest  # noqa: E402
from executor.planning.sizes import (  # noqa: E402
    PlanRequest,
    kv_layer_bytes,
)
from tests.synthetic_gguf import write_moe_gguf  # noqa: E402


class Sink:
    def __init__(self) -> None:
        self.tokens = 0

    def started(self, item_id: int) -> None:
        pass

    def finished(self, item_id: int, record) -> None:
        self.tokens += record.completion_tokens

    def failed(self, item_id: int, reason: str) -> None:
        raise RuntimeError(reason)

    def dropped(self) -> set[int]:
        return set()

    def stop_requested(self) -> bool:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_moe_gguf(Path(tmp) / "tiny-gpt-oss.gguf", "tiny-gpt-oss")
        info = read_model_info(path)
        system = " ".join(f"rule{i % 97}" for i in range(args.system_words))
        requests = [
            GenerationRequest(
                item_id=i, custom_id=str(i), max_tokens=args.max_tokens, temperature=0.0,
                top_p=1.0, seed=0,
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": f"Question number {i}?"}],
            )
            for i in range(args.prompts)
        ]  # fmt: skip
        print(
            f"tiny gpt-oss (window {info.n_swa}), {args.prompts} chats sharing a "
            f"{args.system_words}-word system prompt, parallel {args.parallel}, ctx "
            f"{args.ctx}, {args.max_tokens} new tokens each"
        )
        rows = {}
        for swa_full in (True, False):
            spec = LoadSpec(
                engine="llama", model_path=str(path), n_ctx=args.ctx, n_gpu_layers=0,
                parallel=args.parallel, swa_full=swa_full,
            )  # fmt: skip
            req = PlanRequest(n_ctx=args.ctx, parallel=args.parallel, swa_full=swa_full)
            planned = sum(kv_layer_bytes(info, req))
            reported = dry_run(spec).kv_bytes
            engine = LlamaEngine(spec)
            sink = Sink()
            started = time.perf_counter()
            engine.run_batch(requests, sink)
            seconds = time.perf_counter() - started
            prompt = sum(len(engine.prompter.prompt_tokens(r)[0]) for r in requests)
            rows[swa_full] = (
                planned,
                reported,
                prompt,
                engine.reused_tokens,
                sink.tokens / seconds,
            )
            engine.close()
        for swa_full, (planned, reported, prompt, reused, rate) in rows.items():
            print(
                f"  swa_full={'on ' if swa_full else 'off'}  KV plan {planned / 2**20:6.2f} MiB, "
                f"llama.cpp {reported / 2**20:6.2f} MiB; prompt tokens {prompt}, "
                f"{prompt - reused} computed, {reused} from the cache; {rate:.1f} tok/s"
            )
        on, off = rows[True], rows[False]
        computed = (off[2] - off[3]) / max(on[2] - on[3], 1)
        print(
            f"  off/on: KV {off[0] / on[0]:.2f}×, prompt tokens computed {computed:.2f}×, "
            f"tok/s {off[4] / on[4]:.2f}×"
        )


if __name__ == "__main__":
    main()

"""Parallel decoding with the real default model: same prompts as llama-cpp-python, no
cross-talk between sequences, outputs as the sequential path gives them, prefixes shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from executor.engine.protocol import LoadSpec
from executor.params import GenerationRequest
from tests.helpers import ROOT, generate_in_process, read_jsonl, run_cli, write_jsonl

pytestmark = pytest.mark.model

GREEDY = {"max_tokens": 48, "temperature": 0.0, "top_p": 1.0, "seed": 0}
CODE_WORDS = [
    "aardvark",
    "bluebird",
    "cactus",
    "dolphin",
    "eggplant",
    "falcon",
    "giraffe",
    "harmonica",
    "igloo",
    "jellyfish",
    "kangaroo",
    "lighthouse",
]


def example_requests(defaults: dict | None = None) -> list[GenerationRequest]:
    rows = read_jsonl(ROOT / "examples" / "prompts.jsonl")
    return [
        GenerationRequest.build(i, r["custom_id"], r, {**GREEDY, **(defaults or {})})
        for i, r in enumerate(rows)
    ]


def generate(
    model: Path, requests: list[GenerationRequest], parallel: int, log: Path
) -> dict[int, str]:
    """Run a batch through a real model process; item id → output."""
    spec = LoadSpec(
        engine="llama", model_path=str(model), n_ctx=1024, n_gpu_layers=0, parallel=parallel
    )
    return generate_in_process(spec, log, requests)


def test_chat_prompts_tokenize_exactly_as_create_chat_completion(default_model):
    """The engine's prompt tokens equal those llama-cpp-python feeds create_completion."""
    from llama_cpp import Llama

    from executor.engine.llama import LlamaEngine

    llm = Llama(model_path=str(default_model), n_ctx=512, verbose=False)
    captured: list[list[int]] = []

    def capture(prompt, **kwargs):
        captured.append(list(prompt))
        raise StopIteration  # we only want the prompt

    llm.create_completion = capture  # type: ignore[method-assign]
    engine = LlamaEngine(
        LoadSpec(engine="llama", model_path=str(default_model), n_ctx=512, n_gpu_layers=0)
    )
    try:
        for request in example_requests():
            ours, stops = engine.prompter.prompt_tokens(request)
            if request.messages is None:
                expected = llm.tokenize(request.prompt.encode(), add_bos=True, special=True)
            else:
                with pytest.raises(StopIteration):
                    llm.create_chat_completion(messages=request.messages, max_tokens=4)
                expected = captured.pop()
                assert stops == ["<|im_end|>"]
            assert ours == expected, request.custom_id
    finally:
        engine.close()
        llm.close()


def test_no_cross_talk_between_sequences(default_model, tmp_path):
    """Each prompt asks to repeat its own code word. The tiny model does not always manage
    (it answers "eggplant" with a botanical family), so the sequential run says which words
    it repeats; at parallel 8 each of those answers still has its own word, and no answer has
    another prompt's word."""
    requests = [
        GenerationRequest.build(
            i,
            f"w{i}",
            {"messages": [{"role": "user", "content": f"Repeat this word three times: {word}"}]},
            {**GREEDY, "max_tokens": 24},
        )
        for i, word in enumerate(CODE_WORDS)
    ]
    sequential = generate(default_model, requests, 1, tmp_path / "p1.log")
    parallel = generate(default_model, requests, 8, tmp_path / "p8.log")
    repeated = [i for i, word in enumerate(CODE_WORDS) if word in sequential[i].lower()]
    assert len(repeated) >= 8
    for i in repeated:
        assert CODE_WORDS[i] in parallel[i].lower(), (CODE_WORDS[i], parallel[i])
    for i, word in enumerate(CODE_WORDS):
        others = [w for w in CODE_WORDS if w != word and w in parallel[i].lower()]
        assert not others, (word, others, parallel[i])


def test_parallel_outputs_match_the_sequential_path(default_model, tmp_path):
    """Greedy outputs at parallel 4 against parallel 1 on the example prompts (three times
    over, so that slots are reused and prefixes copied). Each sequence has its own KV stream,
    so the arithmetic per sequence is the sequential one: none should differ."""
    requests = [
        GenerationRequest.build(
            i, f"c{i}", {"messages": r.messages} if r.messages else {"prompt": r.prompt}, GREEDY
        )
        for i, r in enumerate(example_requests() * 3)
    ]
    sequential = generate(default_model, requests, 1, tmp_path / "p1.log")
    parallel = generate(default_model, requests, 4, tmp_path / "p4.log")
    differ = [i for i in sequential if sequential[i] != parallel[i]]
    print(f"\n{len(differ)} of {len(sequential)} outputs differ between parallel 1 and 4")
    assert len(differ) <= 2, [(sequential[i], parallel[i]) for i in differ]


def test_shared_system_prompt_is_computed_once(default_model):
    from executor.engine.llama import LlamaEngine

    system = "You are a terse assistant for a bicycle shop. " * 8
    requests = [
        GenerationRequest.build(
            i,
            f"q{i}",
            {
                "messages": [
                    {"role": "system", "content": system},
                    {
                        "role": "user",
                        "content": f"Question {i}: how many wheels does a bicycle have?",
                    },
                ]
            },
            {**GREEDY, "max_tokens": 8},
        )
        for i in range(6)
    ]
    engine = LlamaEngine(
        LoadSpec(
            engine="llama", model_path=str(default_model), n_ctx=512, n_gpu_layers=0, parallel=3
        )
    )

    done: dict[int, str] = {}

    class Sink:
        def started(self, item_id): ...
        def finished(self, item_id, record):
            done[item_id] = record.output

        def failed(self, item_id, reason):
            raise AssertionError(reason)

        def dropped(self):
            return set()

        def stop_requested(self):
            return False

        def progress(self, tokens): ...

        def more(self):
            return []

    try:
        prefix = len(engine.prompter.prompt_tokens(requests[0])[0]) - 20
        engine.run_batch(requests, Sink())
        # Five of the six prompts took the system prompt from the cache.
        assert engine.reused_tokens >= 5 * prefix
        assert len(done) == 6
    finally:
        engine.close()


def test_parallel_end_to_end_through_the_cli(tmp_path, db_path, default_model):
    rows = [
        {
            "custom_id": f"c{i}",
            "messages": [{"role": "user", "content": f"Say the number {i} in words."}],
            "max_tokens": 16,
        }
        for i in range(10)
    ]
    job = run_cli(
        "submit", str(write_jsonl(tmp_path / "in.jsonl", rows)), db_path=db_path, check=True
    ).stdout.strip()
    run = run_cli("run", "--until-empty", "--parallel", "4", "--json", db_path=db_path, check=True)
    assert json.loads(run.stdout)["done"] == 10
    out = read_jsonl(run_cli("export", job, db_path=db_path, check=True).stdout)
    assert [r["custom_id"] for r in out] == [f"c{i}" for i in range(10)]
    assert all(r["status"] == "done" and r["completion_tokens"] > 0 for r in out)


def test_sampling_matches_create_completion_at_temperature(default_model, tmp_path):
    """With the same seed and parameters, the engine samples exactly what llama-cpp-python's
    create_completion samples: the same sampler chain, in the same order."""
    from llama_cpp import Llama

    params = {
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.02,
        "seed": 1234,
        "max_tokens": 40,
    }
    prompts = ["Once upon a time, in a land far away,", "The recipe for a good soup starts with"]
    llm = Llama(model_path=str(default_model), n_ctx=1024, verbose=False)
    try:
        expected = [
            llm.create_completion(prompt=p, **params)["choices"][0]["text"] for p in prompts
        ]
    finally:
        llm.close()
    requests = [
        GenerationRequest.build(i, f"s{i}", {"prompt": p, "params": params}, {**GREEDY, **params})
        for i, p in enumerate(prompts)
    ]
    ours = generate(default_model, requests, 2, tmp_path / "engine.log")
    assert [ours[0], ours[1]] == expected


def test_repeat_penalty_reduces_repetition(default_model, tmp_path):
    prompt = {"prompt": "one two one two one two one two", "max_tokens": 40}
    plain = GenerationRequest.build(0, "a", prompt, GREEDY)
    penalised = GenerationRequest.build(
        1, "b", {**prompt, "params": {"repeat_penalty": 1.5}}, GREEDY
    )
    out = generate(default_model, [plain, penalised], 2, tmp_path / "engine.log")
    assert out[0] != out[1]
    assert out[1].count("two") < out[0].count("two")  # greedy alone loops on "two-two-…"


def test_injected_abort_in_the_real_engine(tmp_path, db_path, default_model):
    """EXECUTOR_FAULT_* reach the real engine too: the first model process aborts mid-decode,
    the items in flight run again, every item is done exactly once."""
    rows = [
        {"custom_id": f"c{i}", "prompt": f"Count to ten: {i},", "max_tokens": 24} for i in range(6)
    ]
    job = run_cli(
        "submit", str(write_jsonl(tmp_path / "in.jsonl", rows)), db_path=db_path, check=True
    ).stdout.strip()
    run = run_cli(
        "run",
        "--until-empty",
        "--parallel",
        "2",
        db_path=db_path,
        env={"EXECUTOR_FAULT_ABORT_AFTER_TOKENS": "10"},
        check=True,
    )
    assert "was killed by SIGABRT while generating" in run.stderr
    out = read_jsonl(run_cli("export", job, db_path=db_path, check=True).stdout)
    assert sorted(r["custom_id"] for r in out) == [f"c{i}" for i in range(6)]
    assert all(r["status"] == "done" for r in out)

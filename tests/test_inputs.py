"""Validation of prompt lines: every kind of bad line gets its own clear reason."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from executor.errors import InputError
from executor.jobs.inputs import PromptFile, format_problems


def scan_lines(tmp_path: Path, content: bytes):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    prompts = PromptFile(str(path))
    return prompts, prompts.scan()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"prompt": "hi"', "not valid JSON"),
        (b'["prompt", "hi"]', "expected a JSON object, got a list"),
        (b'"just a string"', "expected a JSON object, got a string"),
        (b'{"custom_id": "a"}', "needs exactly one of 'prompt' or 'messages'"),
        (b'{"prompt": "a", "messages": []}', "has both 'prompt' and 'messages'"),
        (b'{"prompt": 5}', "prompt must be a string, got a number"),
        (b'{"prompt": "   "}', "prompt is empty"),
        (b'{"messages": "hi"}', "messages must be a non-empty list"),
        (b'{"messages": []}', "messages must be a non-empty list"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role must be one of"),
        (b'{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
        (
            b'{"messages": [{"role": "user", "content": "x"}, '
            b'{"role": "assistant", "content": "y"}]}',
            "the last message is the assistant's",
        ),
        (b'{"prompt": "a", "max_tokens": "10"}', "max_tokens must be an integer, got a string"),
        (b'{"prompt": "a", "max_tokens": 0}', "max_tokens must be at least 1"),
        (b'{"prompt": "a", "max_tokens": true}', "max_tokens must be an integer, got a boolean"),
        (b'{"prompt": "a", "temperature": -1}', "temperature must be between 0 and 5"),
        (b'{"prompt": "a", "top_p": 2}', "top_p must be between 0 and 1"),
        (b'{"prompt": "a", "seed": 1.5}', "seed must be an integer"),
        (b'{"prompt": "a", "top_k": -1}', "top_k must be at least 0"),
        (b'{"prompt": "a", "min_p": 1.5}', "min_p must be between 0 and 1"),
        (b'{"prompt": "a", "repeat_penalty": "x"}', "repeat_penalty must be a number"),
        (b'{"prompt": "a", "stop": [1]}', "stop must be a non-empty string or a list"),
        (b'{"prompt": "a", "custom_id": 7}', "custom_id must be a non-empty string, got a number"),
        (b'{"prompt": "a", "max_token": 7}', "unknown key 'max_token'"),
        (b'{"prompt": "a", "metadata": [1]}', "metadata must be an object"),
        (b'{"prompt": "caf\xe9"}', "not UTF-8: byte 0xe9 at column 16"),
    ],
)
def test_each_kind_of_bad_line_names_line_and_reason(tmp_path: Path, line: bytes, reason: str):
    _, scan = scan_lines(tmp_path, b'{"prompt": "fine"}\n' + line + b"\n")
    assert scan.valid == 1 and scan.invalid == 1
    (problem,) = scan.problems
    assert problem.startswith(f"{tmp_path / 'in.jsonl'}:2: ")
    assert reason in problem


def test_duplicate_custom_id_points_at_first_line(tmp_path: Path):
    _, scan = scan_lines(
        tmp_path, b'{"prompt": "a", "custom_id": "x"}\n\n{"prompt": "b", "custom_id": "x"}\n'
    )
    where = tmp_path / "in.jsonl"
    assert scan.problems == [f"{where}:3: duplicate custom_id 'x' (first on line 1)"]


def test_default_custom_id_is_the_line_number_and_blank_lines_are_skipped(tmp_path: Path):
    prompts, scan = scan_lines(tmp_path, b'\n{"prompt": "a"}\n   \n{"prompt": "b"}\n')
    assert scan.valid == 2 and scan.invalid == 0
    assert [(e.line, e.custom_id) for e in prompts.entries()] == [(2, "2"), (4, "4")]


def test_an_implicit_custom_id_may_collide_with_an_explicit_one(tmp_path: Path):
    _, scan = scan_lines(tmp_path, b'{"prompt": "a", "custom_id": "2"}\n{"prompt": "b"}\n')
    assert "duplicate custom_id '2' (first on line 1)" in scan.problems[0]


def test_empty_file_is_an_error(tmp_path: Path):
    with pytest.raises(InputError, match="empty file"):
        scan_lines(tmp_path, b"\n  \n")


def test_only_the_first_20_problems_are_listed_then_a_count(tmp_path: Path):
    _, scan = scan_lines(tmp_path, b"nope\n" * 25)
    lines = format_problems(scan)
    assert len(lines) == 21
    assert lines[-1] == "... and 5 more invalid lines"


def test_request_keeps_params_messages_and_metadata(tmp_path: Path):
    prompts, _ = scan_lines(
        tmp_path,
        b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": '
        b'[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "stop": "END", '
        b'"temperature": 1, "metadata": {"k": 1}}\n',
    )
    (entry,) = list(prompts.entries())
    assert entry.request == {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"}],
        "params": {"stop": ["END"], "temperature": 1.0},
        "metadata": {"k": 1},
    }


def test_scan_hash_is_the_sha256_of_the_bytes(tmp_path: Path):
    content = b'{"prompt": "a"}\r\n\n{"prompt": "b"}'
    _, scan = scan_lines(tmp_path, content)
    assert scan.sha256 == hashlib.sha256(content).hexdigest()


def test_missing_file(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        PromptFile(str(tmp_path / "absent.jsonl"))

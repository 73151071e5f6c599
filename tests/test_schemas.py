"""Structured output that holds: schemas no output can meet are refused at submit, and every
output is checked against its schema after generation (the grammar does not carry every
keyword)."""

from __future__ import annotations

import json

import pytest

from executor.schemas import output_problem, unsatisfiable
from tests.helpers import read_jsonl, run_cli, run_cli_process, write_jsonl

BETWEEN = {"type": "integer", "minimum": 5, "maximum": 10}


@pytest.mark.parametrize(
    "schema, says",
    [
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum 5 is above maximum 1"),
        ({"type": "number", "exclusiveMinimum": 3, "maximum": 3}, "leaves nothing"),
        ({"type": "string", "minLength": 9, "maxLength": 2}, "minLength 9 is above maxLength 2"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems 3 is above maxItems 1"),
        ({"enum": []}, "enum is empty"),
        (
            {"type": "object", "properties": {"a": {}}, "required": ["b"],
             "additionalProperties": False},
            "required property 'b'",
        ),
        ({"type": "object", "properties": {"n": {"enum": []}}}, ".properties.n: enum is empty"),
        ({"type": "nope"}, "is not a valid JSON schema"),
    ],
)  # fmt: skip
def test_schemas_no_output_can_meet_are_refused_at_submit(
    tmp_path, db_path, tiny_model, schema, says
):
    assert says in unsatisfiable(schema)
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x", "json_schema": schema}])
    done = run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path)
    assert done.returncode == 2 and says in done.stderr and f"{path}:1:" in done.stderr
    spec_schema = tmp_path / "schema.json"
    spec_schema.write_text(json.dumps(schema))
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "x"}])
    flag = run_cli("submit", str(good), "--model", str(tiny_model), "--json-schema",
                   str(spec_schema), db_path=db_path)  # fmt: skip
    assert flag.returncode == 2 and says in flag.stderr


def test_satisfiable_schemas_pass():
    for schema in (BETWEEN, {"type": "object", "properties": {"a": {"type": "string"}},
                             "required": ["a"], "additionalProperties": False},
                   {"minimum": 1, "exclusiveMaximum": 2}, {"enum": [1]}):  # fmt: skip
        assert unsatisfiable(schema) is None


def test_outputs_are_checked_against_every_keyword():
    assert output_problem("7", BETWEEN) is None
    assert "1000000000000000 is greater than the maximum of 10" in output_problem(
        "1000000000000000", BETWEEN
    )
    assert "not JSON" in output_problem('{"a": ', {"type": "object"})
    problem = output_problem(
        '{"tags": ["x", "x"]}', {"properties": {"tags": {"uniqueItems": True}}}
    )
    assert "['tags']" in problem and "non-unique" in problem


@pytest.mark.model
def test_the_default_model_cannot_slip_a_bound_past_the_grammar(tmp_path, db_path, default_model):
    """The grammar makes an integer; only the check after generation sees the bounds."""
    rows = [
        {"custom_id": "bounded", "prompt": "The number is", "max_tokens": 12,
         "json_schema": BETWEEN},
        {"custom_id": "plain", "prompt": "The number is", "max_tokens": 12,
         "json_schema": {"type": "integer"}},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    run_cli("submit", str(path), "--model", str(default_model), db_path=db_path, check=True)
    run_cli_process("run", "--until-empty", "--ctx", "256", db_path=db_path, check=True)
    out = {r["custom_id"]: r for r in read_jsonl(
        run_cli("export", "1", "--include-failed", db_path=db_path, check=True).stdout
    )}  # fmt: skip
    plain = int(out["plain"]["output"])  # what the grammar alone lets through
    bounded = out["bounded"]
    if 5 <= plain <= 10:
        assert bounded["status"] == "done"
    else:
        assert bounded["status"] == "failed"
        assert "does not meet json_schema" in bounded["error"]
        assert "maximum of 10" in bounded["error"] or "minimum of 5" in bounded["error"]
    openai = read_jsonl(run_cli("export", "1", "--format", "openai", db_path=db_path).stdout)
    if bounded["status"] == "failed":
        (line,) = [x for x in openai if x["custom_id"] == "bounded"]
        assert line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["code"] == "json_schema_not_met"

"""JSON schemas for structured output: refused at submit when no output could ever meet
them, and every output checked against its schema after generation.

llama.cpp builds a grammar from the schema (llama-cpp-python's converter), which constrains
generation by `type`, `properties`, `required`, `additionalProperties`, `items`,
`prefixItems`, `minItems`/`maxItems`, `enum`, `const`, `anyOf`/`oneOf`/`allOf`, `$ref`,
`pattern`, `minLength`/`maxLength` and the formats `date`, `time`, `date-time` and `uuid`.
Other keywords (numeric bounds `minimum`, `maximum`, `exclusiveMinimum`,
`exclusiveMaximum`, `multipleOf`; `uniqueItems`, `minProperties`/`maxProperties`,
`contains`, `not`, `if`/`then`/`else`, `dependentRequired`, other formats) do not reach the
grammar: an integer of a schema `{minimum: 5, maximum: 10}` can come out as 1000000. So
every output is validated with `jsonschema` (Draft 2020-12 unless the schema says otherwise)
and an item whose output does not hold fails with the validator's message. It is not run
again with another seed: the default, greedy decoding, would give the same text.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

BOUNDS = (  # (lower, upper) keyword pairs where lower > upper admits nothing
    ("minimum", "maximum"),
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
    ("minContains", "maxContains"),
)


def unsatisfiable(schema: dict[str, Any]) -> str | None:
    """Why no value can meet `schema` (or why it is no schema at all), where it can be seen
    without generating: a bound above its upper bound, an empty enum, a required property
    that additionalProperties: false forbids; None if nothing is seen."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.path)
        return f"is not a valid JSON schema: {exc.message}" + (f" at {where}" if where else "")
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((sub, f"{path}[{i}]") for i, sub in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        problem = _node_problem(node)
        if problem:
            return f"{path or ' (the root)'}: {problem}: no output can meet it"
        stack.extend((sub, f"{path}.{key}") for key, sub in node.items())
    return None


def _node_problem(node: dict[str, Any]) -> str | None:
    def number(key: str) -> float | None:
        value = node.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    for low, high in BOUNDS:
        a, b = number(low), number(high)
        if a is not None and b is not None and a > b:
            return f"{low} {a} is above {high} {b}"
    lows = [(k, number(k)) for k in ("minimum", "exclusiveMinimum") if number(k) is not None]
    highs = [(k, number(k)) for k in ("maximum", "exclusiveMaximum") if number(k) is not None]
    for lk, lv in lows:
        for hk, hv in highs:
            if "exclusive" in lk + hk and lv >= hv:  # type: ignore[operator]
                return f"{lk} {lv} leaves nothing below {hk} {hv}"
    if "enum" in node and node["enum"] == []:
        return "enum is empty"
    if node.get("additionalProperties") is False and isinstance(node.get("required"), list):
        allowed = set(node.get("properties") or {})
        missing = [r for r in node["required"] if isinstance(r, str) and r not in allowed]
        if missing and not node.get("patternProperties"):
            return (
                f"required property {missing[0]!r} is not among its properties, and "
                "additionalProperties is false"
            )
    return None


def output_problem(output: str, schema: dict[str, Any]) -> str | None:
    """Why `output` does not meet `schema`, in one line; None when it does."""
    try:
        value = json.loads(output)
    except ValueError as exc:
        return (
            f"the output is not JSON ({exc.msg} at character {exc.pos}; cut short by max_tokens?)"
        )
    error = _validator(json.dumps(schema, sort_keys=True)).best_match(value)
    if error is None:
        return None
    where = "".join(f"[{p!r}]" for p in error.absolute_path) or " (the root)"
    return f"the output does not meet json_schema at{where}: {error.message}"


@lru_cache(maxsize=64)
def _validator(schema_text: str) -> Any:
    """One validator per schema (a job's items share theirs)."""
    from jsonschema import exceptions
    from jsonschema.validators import validator_for

    schema = json.loads(schema_text)
    validator = validator_for(schema)(schema)

    class Checker:
        def best_match(self, value: Any) -> Any:
            return exceptions.best_match(validator.iter_errors(value))

    return Checker()

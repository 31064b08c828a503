"""Structured outputs as OpenAI and vLLM spell them -> the one `StructuredOutput` a request carries
(workers/api/structured.py), or an `ApiError` naming the field.

Accepted spellings (README.md "Structured outputs"):
- `response_format` (chat): `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name",
  "schema", "strict", "description"}}` (OpenAI's);
- `structured_outputs` (chat and completions): `{"json" | "regex" | "choice" | "grammar" | "json_object":
  ...}` (vLLM's field since 0.10);
- `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (vLLM's older fields; vLLM 0.32
  removed them and ignores them with a warning, leaving the output unconstrained; kvrelay keeps their
  effect).
At most one constraint per request: a second one is a 400 naming it, never a silent precedence.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from kvrelay.workers.api.structured import StructuredOutput, grammar_error, json_schema_output

# vLLM's StructuredOutputsParams constraint keys; its other keys (whitespace and additionalProperties
# switches, structural tags) are refused by name rather than ignored.
_CONSTRAINT_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class StructuredError(ValueError):
    """A structured-output field the request got wrong; `param` names it (an `ApiError` 400 upstream)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def requested_constraint(response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None,
                         guided: dict[str, Any]) -> tuple[StructuredOutput, str] | None:
    """The request's one constraint and the parameter that holds it (`response_format.json_schema.schema`,
    `structured_outputs.regex`, `guided_json`, ...; None: unconstrained). `guided`: the guided_* fields by
    name (None when absent). Checks shape only (no compiling; `GrammarChecks` does)."""
    found: list[tuple[str, tuple[StructuredOutput, str]]] = []  # (top-level field, (constraint, param))
    if response_format is not None:
        c = _from_response_format(response_format)
        if c is not None:
            found.append(("response_format", c))
    if structured_outputs is not None:
        found.append(("structured_outputs", _from_structured_outputs(structured_outputs)))
    for name, kind in _GUIDED.items():
        if guided.get(name) is not None:
            found.append((name, (_constraint(kind, guided[name], name), name)))
    if len(found) > 1:
        first, second = found[0][0], found[1][0]
        raise StructuredError(f"only one structured-output constraint is allowed per request; "
                              f"'{second}' conflicts with '{first}'.", second)
    return found[0][1] if found else None


def _from_response_format(rf: dict[str, Any]) -> tuple[StructuredOutput, str] | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(kind="json_object"), "response_format"
    if kind != "json_schema":
        raise StructuredError(f"type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'.",
                              "response_format")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise StructuredError("type 'json_schema' needs a 'json_schema' object.", "response_format.json_schema")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise StructuredError("'name' is required (a non-empty string).", "response_format.json_schema.name")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise StructuredError("'strict' must be a boolean.", "response_format.json_schema.strict")
    if "schema" not in spec:
        raise StructuredError("'schema' is required.", "response_format.json_schema.schema")
    param = "response_format.json_schema.schema"
    return _json_schema(spec["schema"], param), param


def _from_structured_outputs(so: dict[str, Any]) -> tuple[StructuredOutput, str]:
    unknown = sorted(set(so) - set(_CONSTRAINT_KEYS))
    if unknown:
        raise StructuredError(f"{unknown[0]!r} is not supported; supported keys: {', '.join(_CONSTRAINT_KEYS)}.",
                              f"structured_outputs.{unknown[0]}")
    given = [k for k in _CONSTRAINT_KEYS if so.get(k) is not None]
    if len(given) != 1:
        raise StructuredError(f"exactly one of {', '.join(_CONSTRAINT_KEYS)} must be given "
                              f"({'none' if not given else ', '.join(given)} given).", "structured_outputs")
    key = given[0]
    param = f"structured_outputs.{key}"
    if key == "json_object":
        if so[key] is not True:
            raise StructuredError("must be true.", param)
        return StructuredOutput(kind="json_object"), param
    return _constraint(key, so[key], param), param


def _constraint(kind: str, value: Any, param: str) -> StructuredOutput:
    if kind == "json":
        return _json_schema(value, param)
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise StructuredError("must be a list of strings.", param)
        s = StructuredOutput(kind="choice", choices=tuple(value))
    elif not isinstance(value, str):
        raise StructuredError("must be a string.", param)
    else:
        s = StructuredOutput(kind="regex" if kind == "regex" else "grammar", spec=value)
    problem = s.problem()
    if problem is not None:
        raise StructuredError(f"{problem}.", param)
    return s


def _json_schema(schema: Any, param: str) -> StructuredOutput:
    if isinstance(schema, str):  # vLLM takes a schema as JSON text too
        try:
            schema = json.loads(schema)
        except ValueError:
            raise StructuredError("a schema given as a string must be JSON text.", param) from None
    if not isinstance(schema, dict):
        raise StructuredError("a JSON schema must be a JSON object.", param)
    return json_schema_output(schema)


class GrammarChecks:
    """Compiles each distinct constraint once (without a tokenizer: schema, regex and grammar errors) and
    remembers the verdict, bounded (least recently used out), so a client repeating its schema pays
    the check once. One per frontend pipeline."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._verdicts: OrderedDict[StructuredOutput, str | None] = OrderedDict()

    def check(self, s: StructuredOutput, param: str) -> None:
        """Raises StructuredError naming `param` when `s` cannot be compiled."""
        if s in self._verdicts:
            self._verdicts.move_to_end(s)
            error = self._verdicts[s]
        else:
            error = grammar_error(s)
            self._verdicts[s] = error
            if len(self._verdicts) > self.capacity:
                self._verdicts.popitem(last=False)
        if error is not None:
            what = {"json": "JSON schema", "json_object": "JSON object", "regex": "regular expression",
                    "choice": "choice list", "grammar": "grammar"}[s.kind]
            raise StructuredError(f"invalid or unsupported {what}: {error[:500]}", param)

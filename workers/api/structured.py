"""Structured outputs in the contract: one constraint a request's output must match (a JSON schema, any
JSON object, a regular expression, one of a list of strings, or a grammar), and its translation into
llguidance's grammar form, which the native engine compiles and the frontend validates.

Why llguidance (over xgrammar): it runs on CPU with no dependency at all (one abi3 wheel; xgrammar
requires torch, transformers, triton, pydantic and apache-tvm-ffi, and would try to pull another torch),
computes a token mask in tens of microseconds with near-zero grammar compile time (its lexer is built
lazily, so a new schema costs milliseconds, not seconds), and covers the most of JSON Schema in the
JSONSchemaBench comparison; it is also one of vLLM's backends, so both engines read the same schemas the
same way. The JSON whitespace rule is vLLM's default: flexible whitespace between tokens.

llguidance is imported lazily: the contract's Structs are used by processes that never constrain output.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]
MAX_CHOICES = 1024  # a longer list is a grammar of its own; refused rather than compiled


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What the output must match. Frozen and made of hashable fields: it is the grammar cache's key.

    - json: `spec` is the JSON schema, as canonical JSON text (keys sorted: equal schemas, equal keys);
    - json_object: any JSON object (`spec` empty);
    - regex: `spec` is the pattern (Rust `regex` syntax, which Python's common syntax is a subset of),
      matched by the whole output;
    - choice: the output is exactly one of `choices` (non-empty);
    - grammar: `spec` is a Lark grammar (llguidance's dialect) or a GBNF/EBNF grammar (llama.cpp's).
    """

    kind: StructuredKind
    spec: str = ""
    choices: tuple[str, ...] = ()
    # The same constraint as xgrammar's structural tag (JSON text), for an engine whose grammar backend
    # reads that form better (vLLM: a forced tool call, frontend/tool_parsers.py); "" where there is none.
    # Engines that compile llguidance grammars (the native one) ignore it.
    structural_tag: str = ""

    def problem(self) -> str | None:
        """What is wrong with the constraint's shape (checked without compiling), or None."""
        if self.kind == "choice":
            if not self.choices:
                return "choice must be a non-empty list of strings"
            if len(self.choices) > MAX_CHOICES:
                return f"choice may hold at most {MAX_CHOICES} strings"
        elif self.kind != "json_object" and not self.spec:
            return f"the {self.kind} constraint must not be empty"
        return None

    def grammar(self) -> str:
        """llguidance's grammar for this constraint (serialized; compile it with `LLMatcher`). Raises
        ValueError for a spec llguidance cannot even read (not JSON, a GBNF it cannot convert)."""
        import llguidance

        flexible: Any = {"whitespace_flexible": True}
        if self.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=flexible)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=flexible)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choices))
        return llguidance.grammar_from("grammar", self.spec)


def json_schema_output(schema: Any) -> StructuredOutput:
    """A JSON-schema constraint with its spec compact (no spaces): the same schema sent twice, or by two
    clients, is one cache entry. Key order is kept: the grammar writes an object's properties in the
    schema's order (llguidance and xgrammar alike, as OpenAI does), so a reordered schema is another
    constraint (sorting them made kvrelay write `{"age", "name"}` where vLLM writes `{"name", "age"}`)."""
    return StructuredOutput(kind="json", spec=json.dumps(schema, separators=(",", ":")))


def grammar_error(s: StructuredOutput, tokenizer: Any = None) -> str | None:
    """Why `s` cannot be compiled (an invalid or unsupported JSON schema, a bad regex or grammar), or
    None. With an llguidance `tokenizer`, also checks it against that vocabulary."""
    import llguidance

    shape = s.problem()
    if shape is not None:
        return shape
    try:
        grammar = s.grammar()
    except (ValueError, TypeError) as e:
        return str(e)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    return messages[0] if is_error else None  # warnings (an ignored keyword) do not refuse the request

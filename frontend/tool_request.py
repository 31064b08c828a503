"""A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, checked: `ToolRequest`, or a 400
naming the field (`tools[1].function.name`, `tool_choice`).

Semantics (OpenAI's, as vLLM serves them; frontend/README.md "Tool calling"):
- `tool_choice` defaults to `auto` with tools and `none` without;
- `none`: the tools are still rendered into the prompt (vLLM's default), the output is plain content,
  never parsed for calls;
- `auto`: the model decides; its output is parsed for calls (tool_parsers.py);
- `required` / `{"type": "function", "function": {"name": ...}}`: the output is made a valid call by
  construction (a grammar over the parser's markup and the functions' JSON schemas, tool_parsers.py);
  `required` with no tools, or a name not among them, is a 400;
- `parallel_tool_calls: false`: at most one call (the grammar allows one; `auto` keeps the first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["none", "auto", "required", "named"]
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule for function names
_STRING_MODES: dict[str, Mode] = {"none": "none", "auto": "auto", "required": "required"}
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(ValueError):
    """A tools field the request got wrong; `param` names it (an ApiError 400 upstream)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # a JSON schema (an empty object schema when the client gave none)
    spec: dict[str, Any]  # the client's whole entry ({"type": "function", "function": {...}}), for the template


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    mode: Mode
    name: str | None = None  # the forced function when mode == "named"
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        """Whether the output is read for tool calls (every mode but none)."""
        return self.mode != "none" and bool(self.tools)

    @property
    def forced(self) -> tuple[Tool, ...]:
        """The functions the output must call one of (required, named), or () when not forced."""
        if self.mode == "named":
            return tuple(t for t in self.tools if t.name == self.name)
        return self.tools if self.mode == "required" else ()

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.spec for t in self.tools] or None


def tool_request(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                 parallel_tool_calls: bool | None) -> ToolRequest:
    """Raises ToolError naming the field."""
    parsed = tuple(_tool(t, i) for i, t in enumerate(tools or []))
    seen: set[str] = set()
    for i, t in enumerate(parsed):
        if t.name in seen:
            raise ToolError(f"function name {t.name!r} appears twice.", f"tools[{i}].function.name")
        seen.add(t.name)
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        return ToolRequest(parsed, "auto" if parsed else "none", parallel=parallel)
    if isinstance(tool_choice, str):
        mode = _STRING_MODES.get(tool_choice)
        if mode is None:
            raise ToolError(f"{tool_choice!r} is not one of 'none', 'auto', 'required' or a function object.",
                            "tool_choice")
        if tool_choice == "required" and not parsed:
            raise ToolError("'required' needs at least one tool in 'tools'.", "tool_choice")
        return ToolRequest(parsed, mode, parallel=parallel)
    fn = tool_choice.get("function")
    if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError('a named tool choice is {"type": "function", "function": {"name": ...}}.', "tool_choice")
    if fn["name"] not in seen:
        raise ToolError(f"function {fn['name']!r} is not among the request's tools.", "tool_choice.function.name")
    return ToolRequest(parsed, "named", fn["name"], parallel)


def _tool(entry: Any, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(entry, dict) or entry.get("type") != "function":
        raise ToolError("only tools of type 'function' are supported.", f"{where}.type")
    fn = entry.get("function")
    if not isinstance(fn, dict):
        raise ToolError("a tool needs a 'function' object.", f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError("must be 1-64 letters, digits, '_', '.' or '-'.", f"{where}.function.name")
    if not isinstance(fn.get("description", ""), str):
        raise ToolError("must be a string.", f"{where}.function.description")
    if not isinstance(fn.get("strict", False), (bool, type(None))):
        raise ToolError("must be a boolean.", f"{where}.function.strict")
    parameters = fn.get("parameters", _EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise ToolError("must be a JSON schema object.", f"{where}.function.parameters")
    return Tool(name, parameters, entry)

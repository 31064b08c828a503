"""Chat messages as clients send them (OpenAI's shapes), checked before any template sees them.

Roles: system, developer, user, assistant, tool (others reach the template, which may refuse them).
An assistant message may carry `tool_calls` instead of content (`content: null`); a `tool` message
answers one call (`tool_call_id`, content). Each problem is a 400 naming the message's field
(`messages[2].tool_calls[0].function.arguments`), never a template error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
from msgspec import UNSET, Struct, UnsetType


class ContentPart(Struct):
    type: str
    text: str | UnsetType = UNSET


class ChatMessage(Struct):
    # UNSET fields are left out of `to_builtins`, so templates see `is defined` as the client meant it.
    role: str
    content: str | list[ContentPart] | None | UnsetType = UNSET
    name: str | UnsetType = UNSET
    tool_calls: list[dict[str, Any]] | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET


Check = Callable[[bool, str, str], None]  # (ok, message, param): raises the 400 when not ok


def check_messages(messages: list[ChatMessage], check: Check) -> None:
    check(bool(messages), "must be a non-empty list.", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.content is UNSET or m.content is None:
            check(m.role == "assistant", f"content is required for role '{m.role}'.", f"{where}.content")
        elif isinstance(m.content, list):
            for j, part in enumerate(m.content):
                check(part.type == "text", f"content part type '{part.type}' is not supported; only 'text' parts are.",
                      f"{where}.content[{j}].type")
                check(isinstance(part.text, str), "a text content part needs a 'text' string.",
                      f"{where}.content[{j}].text")
        if m.tool_calls is not UNSET:
            check(m.role == "assistant", "only assistant messages carry tool_calls.", f"{where}.tool_calls")
            for j, call in enumerate(m.tool_calls):
                _check_call(call, f"{where}.tool_calls[{j}]", check)
        if m.role == "tool":
            check(isinstance(m.tool_call_id, str) and bool(m.tool_call_id),
                  "a tool message needs the 'tool_call_id' of the call it answers.", f"{where}.tool_call_id")


def _check_call(call: dict[str, Any], where: str, check: Check) -> None:
    check(call.get("type", "function") == "function", "only 'function' tool calls are supported.", f"{where}.type")
    check(isinstance(call.get("id", ""), str), "must be a string.", f"{where}.id")
    fn = call.get("function")
    if not isinstance(fn, dict):
        check(False, "a tool call needs a 'function' object.", f"{where}.function")
        return
    check(isinstance(fn.get("name"), str) and bool(fn["name"]), "must be a non-empty string.",
          f"{where}.function.name")
    args = fn.get("arguments", "{}")
    check(isinstance(args, (str, dict)), "must be a JSON string.", f"{where}.function.arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except (ValueError, RecursionError):
            parsed = None
        check(isinstance(parsed, dict), "must be a JSON object encoded as a string.", f"{where}.function.arguments")


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as plain dicts for the chat template (unset fields left out). A tool call's
    `arguments` (a JSON string on the wire) becomes the object it encodes, as vLLM and transformers hand
    it to templates (they write it with `tojson`); the checks above made sure it parses."""
    out = []
    for m in messages:
        d = msgspec.to_builtins(m)
        if "tool_calls" in d:
            d["tool_calls"] = [_template_call(c) for c in d["tool_calls"]]
        out.append(d)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call["function"])
    args = fn.get("arguments", "{}")
    fn["arguments"] = json.loads(args) if isinstance(args, str) else args
    return {**call, "type": "function", "function": fn}

"""The Responses API's `instructions` and `input` -> the chat messages the chat path renders.

`input` is a string (one user message) or a list of items, mapped in order:
- a message item (`{"type": "message", "role", "content"}`, `type` optional): role user, system,
  developer or assistant; content a string or a list of `input_text` / `output_text` parts, joined
  with "" (the chat path's own rule for text parts). `id` and `status` (sent back from an earlier
  response's output) are accepted and carry nothing.
- a `function_call` item (`call_id`, `name`, `arguments` a JSON object as a string): an assistant turn's
  tool call. Calls right after an assistant message (or after each other) join that turn, as the
  model wrote them: text first, then its calls.
- a `function_call_output` item (`call_id`, `output` a string or `input_text` parts): a `tool` message.
`instructions` become a system message before everything else (OpenAI's rule: they are not carried
into later turns, which for a stateless server means only this request).

Anything else (images, files, refusals, reasoning or item_reference items, unknown keys) is a 400
naming the exact field (`input[2].content[0].type`), so nothing a client sends is silently dropped.
"""

from __future__ import annotations

import json
from typing import Any

from kvrelay.frontend.chat_messages import ChatMessage
from kvrelay.frontend.openai_schema import ApiError

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text")
# Keys each item type may carry beyond the ones it needs: what an earlier response's output items hold.
_MESSAGE_KEYS = {"type", "role", "content", "id", "status"}
_CALL_KEYS = {"type", "call_id", "name", "arguments", "id", "status"}
_OUTPUT_KEYS = {"type", "call_id", "output", "id", "status"}
_PART_KEYS = {"type", "text", "annotations", "logprobs"}


def _bad(message: str, param: str) -> ApiError:
    return ApiError.bad_request(f"Invalid '{param}': {message}", param=param)


def chat_messages(input: str | list[Any], instructions: str | None) -> list[ChatMessage]:
    """The conversation the chat template renders; ApiError (400 naming the field) for any bad item."""
    out: list[ChatMessage] = []
    if instructions:
        out.append(ChatMessage(role="system", content=instructions))
    if isinstance(input, str):
        out.append(ChatMessage(role="user", content=input))
        return out
    if not input:
        raise _bad("must be a non-empty string or a non-empty list of items.", "input")
    for i, item in enumerate(input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad("an input item is an object.", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            _add_call(out, _call(item, where))
        elif kind == "function_call_output":
            out.append(_call_output(item, where))
        else:
            raise _bad(f"item type {kind!r} is not supported; this server takes 'message', 'function_call' and "
                       "'function_call_output' items (it stores nothing, so it has no items to reference).",
                       f"{where}.type")
    return out


def _unknown_keys(item: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(item) - allowed)
    if extra:
        raise _bad("not supported in this item.", f"{where}.{extra[0]}")


def _string(item: dict[str, Any], key: str, where: str, empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise _bad("must be a string." if empty else "must be a non-empty string.", f"{where}.{key}")
    return value


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad("a content part is an object.", at)
        if part.get("type") not in _TEXT_PARTS:
            raise _bad(f"content part type {part.get('type')!r} is not supported; only 'input_text' and "
                       "'output_text' parts are (the models served take text only).", f"{at}.type")
        _unknown_keys(part, _PART_KEYS, at)
        texts.append(_string(part, "text", at, empty=True))
    return "".join(texts)


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    _unknown_keys(item, _MESSAGE_KEYS, where)
    role = item.get("role")
    if role not in _ROLES:
        raise _bad(f"role {role!r} is not one of {', '.join(_ROLES)}.", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        content = _text_parts(content, f"{where}.content")
    elif not isinstance(content, str):
        raise _bad("must be a string or a list of text parts.", f"{where}.content")
    return ChatMessage(role=role, content=content)


def _call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A `function_call` item as a chat tool call ({"id", "type", "function": {"name", "arguments"}})."""
    _unknown_keys(item, _CALL_KEYS, where)
    call_id, name = _string(item, "call_id", where), _string(item, "name", where)
    arguments = _string(item, "arguments", where, empty=True)
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise _bad("must be a JSON object encoded as a string.", f"{where}.arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _add_call(out: list[ChatMessage], call: dict[str, Any]) -> None:
    last = out[-1] if out else None
    if last is not None and last.role == "assistant":  # the calls of the turn that wrote this text
        last.tool_calls = [*(last.tool_calls or []), call]
        return
    out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))


def _call_output(item: dict[str, Any], where: str) -> ChatMessage:
    _unknown_keys(item, _OUTPUT_KEYS, where)
    call_id = _string(item, "call_id", where)
    output = item.get("output")
    if isinstance(output, list):
        output = _text_parts(output, f"{where}.output")
    elif not isinstance(output, str):
        raise _bad("must be a string or a list of text parts.", f"{where}.output")
    return ChatMessage(role="tool", content=output, tool_call_id=call_id)

"""Tools and tool turns for chat templates that do not know them (frontend/README.md "Tool calling").

A template that mentions `tools` gets them as `tools=` (its own format); one that mentions `tool_calls`
gets assistant tool calls as they are; one that names the role 'tool' gets tool messages as they are.
Every other template (SmolLM2's, the tiny model's) gets a fixed rendering instead, hermes style:
- tools: a system message (the client's first system message, with this appended after a blank line,
  or a new first message) listing each tool's JSON (`TOOLS_PROMPT`) and asking for `<tool_call>` markup;
- an assistant message with tool_calls: its content (if any), then each call as `<tool_call>` markup
  (one per line), as the model would have written it;
- tool messages: each run of consecutive tool results becomes one user turn, each result as
  `<tool_response>\n<content>\n</tool_response>` (Qwen 2.5's rendering).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from kvrelay.frontend.tool_parsers import ToolCallFormat

TOOLS_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")
_TOOL_ROLE = re.compile(r"""['"]tool['"]""")


def template_inputs(messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None, template: str | None,
                    fmt: ToolCallFormat) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render with `template`: unchanged where the template handles them."""
    source = template or ""
    out = list(messages)
    if not _mentions(source, "tool_calls"):
        out = [_calls_as_text(m, fmt) if m.get("role") == "assistant" else m for m in out]
    if not _TOOL_ROLE.search(source):
        out = _results_as_user_turns(out)
    if not tools or _mentions(source, "tools"):
        return out, list(tools) if tools else None
    listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if out and out[0].get("role") == "system":
        first = _text(out[0].get("content"))
        return [{**out[0], "content": f"{first}\n\n{listing}" if first else listing}, *out[1:]], None
    return [{"role": "system", "content": listing}, *out], None


def _mentions(template: str, word: str) -> bool:
    return re.search(rf"\b{word}\b", template) is not None


def _calls_as_text(m: dict[str, Any], fmt: ToolCallFormat) -> dict[str, Any]:
    calls = m.get("tool_calls") or []
    if not calls and m.get("content") is not None:
        return m
    text = _text(m.get("content"))
    rendered = [fmt.render(c["function"]["name"], c["function"].get("arguments", {})) for c in calls]
    out = {k: v for k, v in m.items() if k != "tool_calls"}
    out["content"] = "\n".join(([text] if text else []) + rendered)
    return out


def _results_as_user_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    merging = False  # the last message of `out` is a user turn made of tool results
    for m in messages:
        if m.get("role") != "tool":
            out.append(m)
            merging = False
            continue
        block = f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"
        if merging:
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
        else:
            out.append({"role": "user", "content": block})
            merging = True
    return out


def _text(content: Any) -> str:
    """A message's content as text (None -> "", text parts joined as the tokenizer joins them)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)

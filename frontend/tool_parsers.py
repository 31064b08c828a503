"""Tool-call formats per model family (`--tool-call-parser`): how a model writes a call, how the frontend
finds it in the output (tool_call_stream.py), and the grammar that makes a forced call (`tool_choice`
required or named) valid by construction.

hermes (NousResearch Hermes 2 Pro, Qwen 2.5/3, and kvrelay's own rendering for templates without tool
support, tool_prompt.py): each call is

    <tool_call>
    {"name": "<function name>", "arguments": {<arguments as a JSON object>}}
    </tool_call>

`auto` picks the format from the chat template: hermes where it writes `<tool_call>` and for templates
that know no tools (they get the hermes rendering). Other families (llama3_json, mistral, ...) are not
built yet; a template with its own, different markup still gets hermes (stated in the log).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from kvrelay.frontend.tool_request import Tool

PARSERS = ("auto", "hermes")


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    open: str  # the markup before a call's JSON
    close: str  # the markup after it
    arguments_key: str  # the member holding the arguments object
    separator: str = "\n"  # between calls, in forced output

    def render(self, name: str, arguments: object) -> str:
        """One call as this format writes it (for rendering earlier assistant turns)."""
        body = json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
        return f"{self.open}\n{body}\n{self.close}"

    def forced_grammar(self, tools: Sequence[Tool], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect, `%json` for the JSON schemas) whose every sentence is one
        call (or, with `parallel`, one or more) of `tools`, each call's arguments valid against its
        function's `parameters` and its name first (llguidance keeps the schema's property order), so a
        stream can send the name before the arguments."""
        rules = ["start: call" + (f" ({json.dumps(self.separator)} call)*" if parallel else ""),
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            schema = {"x-guidance": _COMPACT, "type": "object", "properties": {"name": {"const": tool.name},
                                                       self.arguments_key: tool.parameters},
                      "required": ["name", self.arguments_key], "additionalProperties": False}
            rules.append(f"call_{i}: {json.dumps(self.open + chr(10))} body_{i} {json.dumps(chr(10) + self.close)}")
            rules.append(f"body_{i}: %json {json.dumps(schema)}")
        return "\n".join(rules) + "\n"

    def forced_structural_tag(self, tools: Sequence[Tool], parallel: bool) -> str:
        """The same forced call as xgrammar's structural tag (JSON text), as vLLM's own server builds it for
        this format's tool parser (vllm/tool_parsers/structural_tag_registry.py, 0.32): each call's
        markup and name are fixed text, its arguments match the function's schema; the call is written
        with or without newlines around its JSON; calls follow one another with no separator. vLLM's
        engine takes this form (`structured_outputs.structural_tag`) so that kvrelay on vLLM writes a
        forced call token for token as vLLM's server does (xgrammar reads the Lark grammar's `%json`
        with free whitespace, which a weak model fills). The native engine keeps the Lark grammar."""
        arguments_prefix = f'", "{self.arguments_key}": '
        tags = [{"type": "tag", "begin": f'{begin}{{"name": "{tool.name}{arguments_prefix}',
                 "content": {"type": "json_schema", "json_schema": tool.parameters}, "end": end}
                for tool in tools
                for begin, end in ((self.open + "\n", "}\n" + self.close), (self.open, "}" + self.close))]
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
               "stop_after_first": not parallel}
        return json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)


# Forced calls are written as models write them ({"name": "f", "arguments": {"a": 1}}): one space after
# ':' and ',' and no other whitespace (llguidance's option), not JSON's flexible whitespace, which a weak
# model fills with runs of blanks and newlines until max_tokens.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

HERMES = ToolCallFormat("hermes", "<tool_call>", "</tool_call>", "arguments")
_FORMATS = {"hermes": HERMES}


def pick_format(setting: str, template: str | None) -> tuple[ToolCallFormat, str]:
    """The format for a model whose chat template is `template`, and why (for the log)."""
    if setting != "auto":
        return _FORMATS[setting], f"--tool-call-parser {setting}"
    if template is not None and "<tool_call>" in template:
        return HERMES, "the chat template writes <tool_call>"
    if template is None or "tools" not in template:
        return HERMES, "the chat template has no tool support: tools are rendered in hermes style"
    return HERMES, "the chat template's own tool markup is not a known family: hermes assumed"

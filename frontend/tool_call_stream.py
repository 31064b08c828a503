"""Finding tool calls in a model's output, as it streams: text in, content and tool-call deltas out.

One parser serves both paths: a non-streamed reply is the same parser fed the whole text at once
(`parse_tool_calls`), so the two agree on what is a call. Rules:
- Text outside calls is content. Markup is never content: a suffix that could begin the open tag is
  held back until the next text decides. Trailing whitespace of content is held until other content follows:
  dropped when a call comes next, as is whitespace right after a call (the newlines around calls);
  kept when the output has no call.
- A call is announced (index, id, type, name) as soon as its JSON begins `{"name": "...",
  "arguments":`; the arguments object then streams as the model writes it (its characters up to its
  closing brace; `arguments` is the model's own JSON text, so streamed pieces joined are exactly the
  non-streamed `arguments`). A call whose name comes after its arguments is sent whole when it closes.
- A call that is not valid JSON (or lacks a name) is content, markup included, when it is decided
  before anything of it was sent: always in a non-streamed reply. In a stream whose call was already
  announced, the call stands with the arguments the model wrote (OpenAI's own `arguments` are not
  guaranteed to parse either).
- An unclosed call at the end of the output (max_tokens) is decided as if closed.
- `max_calls`: calls beyond it are dropped (`parallel_tool_calls: false` with `tool_choice: auto`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from kvrelay.frontend.tool_parsers import ToolCallFormat


@dataclass
class CallDelta:
    """A piece of call `index`: the first carries `id` and `name` (and arguments ""), later ones arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


Event = str | CallDelta  # content text, or a piece of a call


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    def __init__(self, fmt: ToolCallFormat, max_calls: int | None = None):
        self.fmt, self.max_calls = fmt, max_calls
        self._head = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*'
                                + re.escape(json.dumps(fmt.arguments_key)) + r"\s*:\s*")
        self._buf = ""  # text after the last decision
        self._in_call = False
        self._ws = ""  # trailing whitespace of content, held back
        self._after_call = False  # the last thing decided was a call
        self.calls = 0  # calls announced so far (the next call's index)
        self._reset_call()

    def _reset_call(self) -> None:
        self._body = ""  # the current call's text after its open tag
        self._started = False  # announced (its first delta out)
        self._args_at = -1  # where its arguments value starts in _body (-1: not streaming arguments)
        self._sent = ""  # its arguments text sent so far
        self._scan = _ValueScan()
        self._pre_ws = ""  # the held whitespace before its open tag (content again if it is no call)

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        """The end of the output: decide whatever is held."""
        out = self._drain(final=True)
        if self._ws and not self.calls:
            out.append(self._ws)
        self._ws = ""
        return out

    def _drain(self, final: bool) -> list[Event]:
        out: list[Event] = []
        fmt = self.fmt
        while True:
            if not self._in_call:
                i = self._buf.find(fmt.open)
                if i >= 0:
                    self._content(self._buf[:i], out)
                    self._pre_ws, self._ws = self._ws, ""  # whitespace before a call is not content
                    self._buf, self._in_call = self._buf[i + len(fmt.open):], True
                    continue
                keep = 0 if final else _partial_suffix(self._buf, fmt.open)
                self._content(self._buf[:len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            searched = max(len(self._body) - len(fmt.close) + 1, 0)
            self._body += self._buf
            self._buf = ""
            j = self._body.find(fmt.close, searched)
            if j >= 0:
                self._buf = self._body[j + len(fmt.close):]
                self._end_call(self._body[:j], fmt.open + self._body[:j + len(fmt.close)], out)
                continue
            if final:
                self._end_call(self._body, fmt.open + self._body, out)
                return out
            self._progress(self._body[:len(self._body) - _partial_suffix(self._body, fmt.close)], out)
            return out

    def _content(self, text: str, out: list[Event]) -> None:
        if self._after_call:  # whitespace right after a call is not content either
            text = text.lstrip()
            self._after_call = not text
        kept = text.rstrip()
        if kept:
            out.append(self._ws + kept)
            self._ws = ""
        self._ws += text[len(kept):]

    def _dropped(self) -> bool:
        return not self._started and self.max_calls is not None and self.calls >= self.max_calls

    def _announce(self, name: str, out: list[Event]) -> None:
        out.append(CallDelta(self.calls, "", new_call_id(), name))
        self.calls += 1
        self._started = True

    def _progress(self, visible: str, out: list[Event]) -> None:
        """Send what the visible part of an open call already settles: its name, then its arguments."""
        if not self._started:
            m = self._head.match(visible)
            if m is None or self._dropped():
                return
            self._announce(json.loads(m.group(1)), out)
            self._args_at = m.end()
        if self._args_at < 0 or self._scan.done:
            return
        value = visible[self._args_at:]
        if not self._sent:
            lead = len(value) - len(value.lstrip())
            self._args_at, value = self._args_at + lead, value[lead:]
        if not value:
            return
        if not self._sent and value[0] != "{":
            self._args_at = -1  # not an object (a JSON string?): sent whole when the call closes
            return
        piece = value[len(self._sent):]
        piece = piece[:self._scan.advance(piece)]
        if piece:
            self._sent += piece
            out.append(CallDelta(self.calls - 1, piece))

    def _end_call(self, body: str, markup: str, out: list[Event]) -> None:
        parsed = parse_call(body, self.fmt.arguments_key)
        self._after_call = self._started or parsed is not None
        if self._dropped():
            pass
        elif self._started:
            if parsed is not None and parsed[1].startswith(self._sent) and parsed[1] != self._sent:
                out.append(CallDelta(self.calls - 1, parsed[1][len(self._sent):]))
        elif parsed is not None:
            self._announce(parsed[0], out)
            out.append(CallDelta(self.calls - 1, parsed[1]))
        else:
            self._ws = self._pre_ws
            self._content(markup, out)
        self._in_call = False
        self._reset_call()


class _ValueScan:
    """Walks a JSON object's text as it arrives, to know where it ends (braces outside strings)."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped, self.done = 0, False, False, False

    def advance(self, text: str) -> int:
        """Characters of `text` that belong to the value (all of them, or up to its closing brace)."""
        for k, c in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return k + 1
        return len(text)


def parse_call(body: str, arguments_key: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call's JSON, or None when it is not a call. The arguments
    text is the model's own (the object's span in `body`), "{}" when absent."""
    text = body.strip()
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json's recursion allows
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(arguments_key, {})
    if isinstance(args, str):
        return obj["name"], args
    if not isinstance(args, dict):
        return None
    return obj["name"], _member_text(text, arguments_key) if arguments_key in obj else "{}"


def _member_text(text: str, key: str) -> str:
    """The source text of member `key` of the JSON object `text` (valid JSON; the last one wins, as in
    json.loads)."""
    decoder, found, i = json.JSONDecoder(), "", 1
    while True:
        i = _skip_ws(text, i)
        if text[i] == "}":
            return found
        name, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the colon
        _, end = decoder.raw_decode(text, i)
        if name == key:
            found = text[i:end]
        i = _skip_ws(text, end)
        i += text[i] == ","


def _skip_ws(text: str, i: int) -> int:
    while text[i] in " \t\n\r":
        i += 1
    return i


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


def parse_tool_calls(fmt: ToolCallFormat, text: str, max_calls: int | None = None) -> tuple[str | None, list[ParsedCall]]:
    """A whole (non-streamed) output: its content (None when empty and calls were made) and its calls."""
    stream = ToolCallStream(fmt, max_calls)
    content: list[str] = []
    calls: list[ParsedCall] = []
    for e in stream.feed(text) + stream.finish():
        if isinstance(e, str):
            content.append(e)
        elif e.id is not None:
            calls.append(ParsedCall(e.id, e.name or "", e.arguments))
        else:
            calls[e.index].arguments += e.arguments
    joined = "".join(content)
    return (joined if joined or not calls else None), calls

"""The output items of one response as the model writes them: content text and tool-call pieces in,
Responses stream events out (without sequence numbers), and the final items.

Text goes into a `message` item with one `output_text` part; each call is a `function_call` item. An
item is opened (`response.output_item.added`, and for a message `response.content_part.added`) when
its first piece arrives and closed (`response.output_text.done` / `response.function_call_arguments.done`,
`response.content_part.done`, `response.output_item.done`) when something else begins or the output
ends. The output always holds at least one item: a reply with neither text nor calls is an empty
message, as the non-streamed chat reply is an empty content. Streamed and non-streamed replies are built
by this same code (non-streamed: one piece holding the whole text), so they agree item for item.
"""

from __future__ import annotations

from typing import Any

from kvrelay.frontend.responses_api_body import (
    FunctionCallItem,
    OutputItem,
    OutputMessage,
    OutputText,
    new_item_id,
)
from kvrelay.frontend.tool_call_stream import CallDelta, Event

Events = list[dict[str, Any]]


class OutputItems:
    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._open: OutputItem | None = None  # the last item, while pieces may still extend it

    def feed(self, events: list[Event]) -> Events:
        """Content text (str) and call pieces (tool_call_stream's CallDelta) -> stream events."""
        out: Events = []
        for e in events:
            if isinstance(e, str):
                self._text(e, out)
            else:
                self._call(e, out)
        return out

    def finish(self, truncated: bool) -> Events:
        """The output ended (`truncated`: at max_output_tokens): close the last item, which is then
        `incomplete` if truncated."""
        out: Events = []
        if not self.items:
            self._open_message(out)
        self._close(out, "incomplete" if truncated else "completed")
        return out

    def snapshot(self) -> list[OutputItem]:
        """The items as they stand (a failed stream's partial output)."""
        return list(self.items)

    def _text(self, text: str, out: Events) -> None:
        if not text:
            return
        if not isinstance(self._open, OutputMessage):
            self._close(out, "completed")
            self._open_message(out)
        msg = self._open
        assert isinstance(msg, OutputMessage)  # just opened, or open already
        msg.content[0].text += text
        out.append({"type": "response.output_text.delta", "item_id": msg.id, "output_index": len(self.items) - 1,
                    "content_index": 0, "delta": text, "logprobs": []})

    def _open_message(self, out: Events) -> None:
        msg = OutputMessage(new_item_id("msg"), [], "in_progress")
        self._add(msg, out)
        part = OutputText("")
        out.append({"type": "response.content_part.added", "item_id": msg.id, "output_index": len(self.items) - 1,
                    "content_index": 0, "part": part})
        msg.content.append(OutputText(""))

    def _call(self, d: CallDelta, out: Events) -> None:
        if d.id is not None:  # a new call: its name and id come first (tool_call_stream's rule)
            self._close(out, "completed")
            self._add(FunctionCallItem(new_item_id("fc"), d.id, d.name or "", "", "in_progress"), out)
        call = self._open
        assert isinstance(call, FunctionCallItem)  # a call's later pieces follow its first
        if d.arguments:
            call.arguments += d.arguments
            out.append({"type": "response.function_call_arguments.delta", "item_id": call.id,
                        "output_index": len(self.items) - 1, "delta": d.arguments})

    def _add(self, item: OutputItem, out: Events) -> None:
        self.items.append(item)
        self._open = item
        out.append({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                    "item": _copy(item)})

    def _close(self, out: Events, status: str) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = len(self.items) - 1
        item.status = status
        if isinstance(item, OutputMessage):
            text = item.content[0].text
            out.append({"type": "response.output_text.done", "item_id": item.id, "output_index": index,
                        "content_index": 0, "text": text, "logprobs": []})
            out.append({"type": "response.content_part.done", "item_id": item.id, "output_index": index,
                        "content_index": 0, "part": OutputText(text)})
        else:
            out.append({"type": "response.function_call_arguments.done", "item_id": item.id, "output_index": index,
                        "arguments": item.arguments})
        out.append({"type": "response.output_item.done", "output_index": index, "item": _copy(item)})


def _copy(item: OutputItem) -> OutputItem:
    """The item as it is now (events are encoded later; the item itself keeps growing)."""
    if isinstance(item, OutputMessage):
        return OutputMessage(item.id, [OutputText(p.text) for p in item.content], item.status)
    return FunctionCallItem(item.id, item.call_id, item.name, item.arguments, item.status)

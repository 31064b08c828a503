"""`POST /v1/responses` request bodies: decoded, checked, and turned into the chat request the chat
path serves (same template, tools, structured outputs, sampling), or a 400 naming the field.

Stateless: nothing is stored, so `previous_response_id` (and `conversation`, `background`, item
references) are refused by name. Every field OpenAI defines that this server cannot honour is a 400
naming it, as is any other unknown field (the Struct forbids them): never silently ignored. Field
names in errors are the Responses API's own (`tools[0].name`, `text.format.schema`,
`max_output_tokens`), also for problems the chat path finds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta, Struct

from kvrelay.frontend.openai_schema import (
    MAX_JSON_DEPTH,
    ApiError,
    ChatCompletionRequest,
    Count,
    decode_request,
    json_depth,
)
from kvrelay.frontend.responses_api_input import chat_messages

if TYPE_CHECKING:
    from kvrelay.frontend.pipeline import Pipeline, Prepared

# Fields of OpenAI's Responses API this server refuses, and why (the 400's message).
REFUSED: dict[str, str] = {
    "previous_response_id": "this server is stateless and stores no responses; send the whole conversation "
                            "as 'input' items (earlier output items included)",
    "conversation": "this server is stateless and stores no conversations; send the whole conversation as 'input'",
    "background": "background responses need a stored response to poll; this server stores none",
    "prompt": "stored prompt templates are not supported; send 'instructions' and 'input'",
    "reasoning": "reasoning options are not supported by the models this server runs",
    "include": "no extra output data (reasoning, logprobs, tool results) can be included",
    "max_tool_calls": "built-in tools are not supported, and function calls are limited by "
                      "'parallel_tool_calls'",
    "top_logprobs": "logprobs are not supported by the Responses endpoint here (use /v1/chat/completions)",
    "service_tier": "there are no service tiers",
    "prompt_cache_key": "prefix caching is automatic (the KV router); a cache key has no effect",
    "prompt_cache_retention": "prefix caching is automatic and its retention is the workers' KV capacity",
    "safety_identifier": "no safety monitoring to identify users to",
    "context_management": "context compaction is not supported",
}
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512  # OpenAI's limits
_FUNCTION_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}
_FORMAT_KEYS = {"type", "name", "schema", "strict", "description"}


class TextConfig(Struct, forbid_unknown_fields=True):
    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}


class ResponsesStreamOptions(Struct, forbid_unknown_fields=True):
    include_obfuscation: bool = False  # true (OpenAI's default) pads deltas; not done here: a 400


class ResponsesRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: Annotated[str | list[Any], Meta(description=(  # items checked by responses_api_input.py
        "a user message, or a list of items: message (role user/system/developer/assistant, content a string "
        "or input_text/output_text parts), function_call (call_id, name, arguments), function_call_output "
        "(call_id, output)"))]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Count | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None  # < 1e-5 is greedy (as vLLM)
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    text: TextConfig | None = None
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    metadata: dict[str, str] | None = None  # echoed
    store: bool | None = None  # accepted; nothing is stored (README "Responses API")
    truncation: Literal["disabled"] | None = None  # the only behaviour: a prompt too long is a 400
    user: str | None = None

    def validate(self) -> None:
        for name in ("input", "tools", "tool_choice", "metadata"):
            _check(json_depth(getattr(self, name)) <= MAX_JSON_DEPTH, f"nested deeper than {MAX_JSON_DEPTH} levels.",
                   name)
        _check(self.text is None or json_depth(self.text.format) <= MAX_JSON_DEPTH,
               f"nested deeper than {MAX_JSON_DEPTH} levels.", "text.format")
        _check(self.stream_options is None or self.stream, "only allowed with stream=true.", "stream_options")
        _check(self.stream_options is None or not self.stream_options.include_obfuscation,
               "obfuscation padding is not supported; send false.", "stream_options.include_obfuscation")
        meta = self.metadata or {}
        _check(len(meta) <= METADATA_MAX_PAIRS, f"at most {METADATA_MAX_PAIRS} pairs.", "metadata")
        _check(all(len(k) <= METADATA_MAX_KEY and len(v) <= METADATA_MAX_VALUE for k, v in meta.items()),
               f"keys are at most {METADATA_MAX_KEY} characters, values at most {METADATA_MAX_VALUE}.", "metadata")
        self.chat_request()  # input items, tools, tool_choice and text.format, checked here (before routing)

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion (the chat path checks it again, with chat field names;
        `renamed` maps those back)."""
        return ChatCompletionRequest(
            model=self.model, messages=chat_messages(self.input, self.instructions), stream=self.stream,
            max_completion_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p,
            tools=[_chat_tool(t, i) for i, t in enumerate(self.tools)] if self.tools is not None else None,
            tool_choice=_chat_tool_choice(self.tool_choice), parallel_tool_calls=self.parallel_tool_calls,
            response_format=_response_format(self.text.format if self.text is not None else None), user=self.user)


def parse_responses_request(body: bytes) -> ResponsesRequest:
    try:
        req: ResponsesRequest = decode_request(body, ResponsesRequest)
    except ApiError as e:
        why = REFUSED.get(e.param or "")
        if why is not None and e.message.startswith("Unsupported parameter"):
            raise ApiError.bad_request(f"Unsupported parameter: '{e.param}': {why}.", param=e.param) from None
        raise
    return req


async def prepare_responses(pipeline: Pipeline, req: ResponsesRequest, request_id: str, arrival: float) -> Prepared:
    """The chat path's preparation of the request (template, tools, constraint, routing), its 400s in
    this API's field names."""
    try:
        return await pipeline.prepare(req.chat_request(), request_id, arrival)
    except ApiError as e:
        raise renamed(e) from None


def renamed(e: ApiError) -> ApiError:
    """An error the chat path raised, with the Responses API's name for its field."""
    if e.param is None:
        return e
    param = _rename(e.param)
    message = e.message.replace(f"'{e.param}'", f"'{param}'")
    if e.code == "context_length_exceeded":  # "... reduce the length of the prompt or of max_tokens."
        message = message.replace("max_tokens", "max_output_tokens")
    return ApiError(e.status, message, e.type, param, e.code, e.retry_after)


_RENAMES = (("response_format.json_schema", "text.format"), ("response_format", "text.format"),
            ("tool_choice.function", "tool_choice"), ("max_completion_tokens", "max_output_tokens"),
            ("max_tokens", "max_output_tokens"), ("messages", "input"))


def _rename(param: str) -> str:
    if param.startswith("tools[") and ".function." in param:  # tools[0].function.name -> tools[0].name
        return param.replace(".function.", ".", 1)
    for old, new in _RENAMES:
        if param == old or param.startswith((old + ".", old + "[")):
            return "input" if new == "input" else new + param[len(old):]  # a message index is not an item's
    return param


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    _check(isinstance(tool, dict) and tool.get("type") == "function",
           "only 'function' tools are supported; built-in tools (web_search, file_search, code_interpreter, "
           "mcp, ...) need services this server does not run.", f"{where}.type")
    extra = sorted(set(tool) - _FUNCTION_TOOL_KEYS)
    _check(not extra, "not supported in a function tool.", f"{where}.{extra[0]}" if extra else where)
    function = {k: v for k, v in tool.items() if k != "type" and v is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice  # none / auto / required: the chat path checks the value
    _check(choice.get("type") == "function" and set(choice) == {"type", "name"} and isinstance(choice["name"], str),
           'a named tool choice is {"type": "function", "name": ...}; other kinds (allowed_tools, built-in '
           "tools) are not supported.", "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None:
        return None
    if fmt.get("type") in ("text", "json_object"):
        extra = sorted(set(fmt) - {"type"})
        _check(not extra, f"not supported with type {fmt['type']!r}.", f"text.format.{extra[0]}" if extra else "")
        return fmt
    _check(fmt.get("type") == "json_schema", "type must be 'text', 'json_object' or 'json_schema'.", "text.format.type")
    extra = sorted(set(fmt) - _FORMAT_KEYS)
    _check(not extra, "not supported in a json_schema format.", f"text.format.{extra[0]}" if extra else "text.format")
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise ApiError.bad_request(f"Invalid '{param}': {message}", param=param)

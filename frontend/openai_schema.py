"""OpenAI API requests and errors (chat completions and completions); bodies are in openai_responses.py.

Requests are decoded with msgspec straight from the body bytes; unknown fields are ignored (clients
send extras). Every rejection is an `ApiError` whose `.body()` is OpenAI's error JSON, with `param`
naming the offending field. Every sampling field accepted has its effect (workers/api/messages.py
`SamplingParams`, README.md "Sampling fields"); what the engines cannot do is refused with a 400 rather
than ignored: best_of != n, echo, suffix. n > 1 is served by choices.py. Structured outputs (response_format, structured_outputs,
guided_*) are read by structured_request.py; messages by chat_messages.py; tools by tool_request.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct

from kvrelay.frontend.chat_messages import ChatMessage, check_messages, message_dicts
from kvrelay.frontend.structured_request import StructuredError, requested_constraint
from kvrelay.frontend.tool_request import ToolError, ToolRequest, tool_request
from kvrelay.workers.api.messages import MAX_LOGIT_BIAS, MAX_PENALTY, MAX_TOP_LOGPROBS
from kvrelay.workers.api.structured import StructuredOutput

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16  # choices per request: each is a sequence on one worker, so n bounds one request's load there
MAX_JSON_DEPTH = 32  # nesting allowed inside free-form fields (tools, tool_calls, response_format, schemas)
# Declared bounds of integer fields, so every accepted value fits the worker wire (msgpack int64/uint64).
INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64 (msgspec bounds are int64; torch takes it)
Count = Annotated[int, Meta(ge=1, le=INT32_MAX)]
TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]
Penalty = Annotated[float, Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)]
TopLogprobCount = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # a logit_bias key: a token id in decimal

# -- errors ---------------------------------------------------------------------------------------


# Seconds a client is told to wait (`Retry-After`) before retrying a refused request: a full queue drains
# within about a second of steps; a missing worker needs a restart (the fleet's restart takes seconds).
RETRY_BUSY_S = 1
RETRY_NO_WORKER_S = 5


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: int | None = None) -> None:
        """`retry_after`: seconds for a `Retry-After` header (set on every 429 and 503 the server sends)."""
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers of this error: JSON, and `Retry-After` when the client should retry."""
        out = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            out.append((b"retry-after", str(self.retry_after).encode()))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return msgspec.json.encode(self.to_dict())

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> ApiError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def model_not_found(cls, model: str) -> ApiError:
        return cls(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    @classmethod
    def invalid_api_key(cls) -> ApiError:
        return cls(401, "Incorrect API key provided.", code="invalid_api_key")

    @classmethod
    def no_worker(cls, model: str) -> ApiError:
        return cls(503, f"No worker is serving model `{model}` right now; retry later.",
                   type="service_unavailable_error", code="no_worker", retry_after=RETRY_NO_WORKER_S)

    @classmethod
    def server_busy(cls, message: str) -> ApiError:
        """Every worker that could serve the request has its waiting queue full (`--max-waiting`)."""
        return cls(429, f"The server is busy: {message}", type="rate_limit_error", code="server_busy",
                   retry_after=RETRY_BUSY_S)

    @classmethod
    def worker_failed(cls, detail: str) -> ApiError:
        return cls(503, f"The request failed on every worker that tried it: {detail}",
                   type="service_unavailable_error", code="worker_failed", retry_after=RETRY_BUSY_S)

    @classmethod
    def context_length_exceeded(cls, max_len: int, prompt_tokens: int, max_tokens: int | None,
                                param: str = "messages") -> ApiError:
        asked = (f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                 f"{max_tokens} for the completion)") if max_tokens else f"the prompt has {prompt_tokens} tokens"
        return cls(400, f"This model's maximum context length is {max_len} tokens. However, {asked}. "
                        "Please reduce the length of the prompt or of max_tokens.",
                   param=param, code="context_length_exceeded")

    @classmethod
    def internal(cls, message: str = "Internal server error.") -> ApiError:
        return cls(500, message, type="internal_error", code="internal_error")


# -- requests -------------------------------------------------------------------------------------


class StreamOptions(Struct):
    include_usage: bool = False


class _Common(Struct, kw_only=True):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    max_tokens: Count | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None  # < 1e-5 is greedy (as vLLM)
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=-1, le=INT32_MAX)] | None = None  # -1 or 0: off (vLLM)
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None  # vLLM extension; 0: off
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None  # vLLM extension; 1: off
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> [-100, 100]
    min_tokens: Annotated[int, Meta(ge=0, le=INT32_MAX)] = 0  # vLLM extension
    seed: Annotated[int, Meta(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None  # kvrelay/vLLM extension
    ignore_eos: bool = False
    user: str | None = None
    cache_salt: str | None = None
    # Structured outputs (structured_request.py): vLLM's field, and its older guided_* fields.
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_kwargs(self, prompt_tokens: int, max_model_len: int,
                        defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments for `workers.protocol.SamplingParams`: unset fields take `defaults`
        (from `generation_defaults`), then OpenAI's. Raises ApiError when the prompt plus the requested
        completion exceed `max_model_len`; without max_tokens the completion gets the rest of the context."""
        d = defaults or {}
        room = max_model_len - prompt_tokens
        asked = self.requested_max_tokens()
        if room < 1 or (asked is not None and asked > room):
            param = "messages" if isinstance(self, ChatCompletionRequest) else "prompt"
            raise ApiError.context_length_exceeded(max_model_len, prompt_tokens, asked, param)

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else d.get(name, fallback)

        max_tokens = asked if asked is not None else room
        _check(self.min_tokens <= max_tokens, f"must not exceed max_tokens ({max_tokens}).", "min_tokens")
        return {
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "temperature": float(pick("temperature", 1.0)),
            "top_p": float(pick("top_p", 1.0)),
            "top_k": max(int(pick("top_k", 0)), 0),
            "min_p": float(pick("min_p", 0.0)),
            "repetition_penalty": float(pick("repetition_penalty", 1.0)),
            "frequency_penalty": float(self.frequency_penalty),
            "presence_penalty": float(self.presence_penalty),
            "logit_bias": self.logit_bias_ids,
            "seed": self.seed,
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
            "logprobs": self.wants_logprobs,
            "top_logprobs": self.num_top_logprobs,
        }

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        """`logit_bias` keyed by int token id (validated)."""
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def constraint(self) -> tuple[StructuredOutput, str] | None:
        """The one structured-output constraint the request asks for and the field naming it, or None;
        ApiError (400 naming the field) for a malformed or second constraint."""
        try:
            return requested_constraint(getattr(self, "response_format", None), self.structured_outputs, {
                "guided_json": self.guided_json, "guided_regex": self.guided_regex,
                "guided_choice": self.guided_choice, "guided_grammar": self.guided_grammar})
        except StructuredError as e:
            raise ApiError.bad_request(f"Invalid '{e.param}': {e}", param=e.param) from None

    @property
    def wants_logprobs(self) -> bool:
        raise NotImplementedError

    @property
    def num_top_logprobs(self) -> int:
        """How many most likely tokens to report per position (0: the chosen token's logprob only)."""
        raise NotImplementedError

    def _validate_common(self) -> None:
        stops = self.stop_list
        _check(len(stops) <= MAX_STOP, f"at most {MAX_STOP} stop sequences are allowed.", "stop")
        _check(all(stops), "stop sequences must be non-empty strings.", "stop")
        _check(self.cache_salt is None or self.cache_salt != "", "must be a non-empty string.",
               "cache_salt")
        _check(self.stream_options is None or self.stream, "only allowed with stream=true.",
               "stream_options")
        _check(self.repetition_penalty is None or math.isfinite(self.repetition_penalty), "must be finite.",
               "repetition_penalty")
        for key, bias in (self.logit_bias or {}).items():
            _check(_TOKEN_ID_KEY.fullmatch(key) is not None and int(key) <= INT32_MAX,
                   f"key {key!r} is not a token id (a non-negative integer).", "logit_bias")
            _check(-MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                   f"the bias of token {key} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}].", "logit_bias")
        for name in ("structured_outputs", "guided_json", "response_format"):
            _check(json_depth(getattr(self, name, None)) <= MAX_JSON_DEPTH,
                   f"nested deeper than {MAX_JSON_DEPTH} levels.", name)
        self.constraint()  # its shape (conflicts, types, empty lists); the grammar is compiled by the pipeline


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobCount | None = None
    tools: list[dict[str, Any]] | None = None  # tool_request.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM extension
    skip_special_tokens: bool = True  # vLLM extension

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    @property
    def num_top_logprobs(self) -> int:
        return self.top_logprobs or 0

    def message_dicts(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for `Tokenizer.apply_chat_template` (unset fields left out)."""
        return message_dicts(self.messages)

    def tool_request(self) -> ToolRequest:
        """The request's tools and tool_choice, checked (400 naming the field)."""
        try:
            return tool_request(self.tools, self.tool_choice, self.parallel_tool_calls)
        except ToolError as e:
            raise ApiError.bad_request(f"Invalid '{e.param}': {e}", param=e.param) from None

    def validate(self) -> None:
        self._validate_common()
        check_messages(self.messages, _check)
        _check(self.top_logprobs is None or self.logprobs, "requires logprobs=true.", "top_logprobs")
        _check(json_depth(self.tools) <= MAX_JSON_DEPTH, f"nested deeper than {MAX_JSON_DEPTH} levels.", "tools")
        _check(json_depth(self.tool_choice) <= MAX_JSON_DEPTH, f"nested deeper than {MAX_JSON_DEPTH} levels.",
               "tool_choice")
        for i, m in enumerate(self.messages):
            if m.tool_calls is not UNSET:
                _check(json_depth(m.tool_calls) <= MAX_JSON_DEPTH, f"nested deeper than {MAX_JSON_DEPTH} levels.",
                       f"messages[{i}].tool_calls")
        self.tool_request()


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    max_tokens: Count | None = 16  # OpenAI's default for completions
    logprobs: TopLogprobCount | None = None  # the top this-many tokens per position (and the chosen one)
    echo: bool = False
    best_of: Count | None = None
    suffix: str | None = None
    skip_special_tokens: bool = True

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def num_top_logprobs(self) -> int:
        return self.logprobs or 0

    @property
    def prompt_token_ids(self) -> list[int] | None:
        """The prompt when given as token ids (validated: a non-empty flat list of ints)."""
        return None if isinstance(self.prompt, str) else self.prompt

    def validate(self) -> None:
        self._validate_common()
        if not isinstance(self.prompt, str):
            _check(bool(self.prompt), "must not be an empty list.", "prompt")
            if not all(type(t) is int for t in self.prompt):  # one pass on the hot path; diagnose only here
                _check(not any(isinstance(t, (str, list)) for t in self.prompt),
                       "batched prompts are not supported: send one string or one list of token ids.", "prompt")
                _check(False, "token ids must be integers.", "prompt")
            _check(min(self.prompt) >= 0 and max(self.prompt) <= INT32_MAX,
                   f"token ids must be in [0, {INT32_MAX}].", "prompt")
        _check(not self.echo, "echo is not supported.", "echo")
        _check(self.best_of in (None, self.n), "must equal n (every sampled sequence is returned).", "best_of")
        _check(not self.suffix, "suffix is not supported.", "suffix")


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    return decode_request(body, ChatCompletionRequest)


def parse_completion_request(body: bytes) -> CompletionRequest:
    return decode_request(body, CompletionRequest)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Token ids from the client (prompt, stop_token_ids) must exist in the model's vocabulary."""
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):  # C-speed scans on the hot path
        return
    bad = next(t for t in ids if not 0 <= t < vocab_size)
    _check(False, f"token id {bad} is out of range for this model (vocabulary size {vocab_size}).", param)


def generation_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """Sampling defaults a model ships in generation_config.json (vLLM applies them the same way)."""
    names = ("repetition_penalty",) if generation_config.get("do_sample") is False else (
        "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    out = {k: generation_config[k] for k in names if k in generation_config}
    return {**out, "temperature": 0.0} if generation_config.get("do_sample") is False else out


_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")  # Structs with forbid_unknown_fields (the Responses API's)


def decode_request(body: bytes, cls: type[Any]) -> Any:
    """`body` decoded as `cls` and validated (`cls.validate()`); every problem is a 400 naming the field."""
    try:
        req = msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        # msgspec: "Expected `int`, got `str` - at `$.max_tokens`", "Object missing required field `model`".
        msg = str(e)
        m, missing, unknown = _PATH.search(msg), _MISSING.search(msg), _UNKNOWN.search(msg)
        path = (m.group(1) if m else "").split("[...]")[0]  # a map's value: msgspec names no key; the map
        if unknown:
            path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise ApiError.bad_request(f"Unsupported parameter: '{path}'.", param=path) from None
        if missing:
            path = f"{path}.{missing.group(1)}" if path else missing.group(1)
            raise ApiError.bad_request(f"Missing required parameter: '{path}'.", param=path) from None
        if m is not None and path:
            raise ApiError.bad_request(f"Invalid '{path}': {msg[:m.start()]}.", param=path) from None
        raise ApiError.bad_request(f"Invalid request body: {msg}.") from None
    except msgspec.DecodeError as e:
        raise ApiError.bad_request(f"The request body is not valid JSON: {e}") from None
    except RecursionError:  # msgspec decodes nested Any values recursively
        raise ApiError.bad_request(f"The request body is nested too deeply (limit {MAX_JSON_DEPTH}).") from None
    req.validate()
    return req


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of decoded JSON, counted up to `limit` + 1 (no deeper: the answer is "too deep")."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((json_depth(c, limit - 1) for c in children), default=0)


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise ApiError.bad_request(f"Invalid '{param}': {message}", param=param)

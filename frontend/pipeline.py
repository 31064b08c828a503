"""One OpenAI request from parsed body to streamed outputs: tokenize, check limits, generate,
detokenize with stop strings, account usage. Shared by chat and text completions.

Errors a client can cause become `ApiError`s with OpenAI's status codes; everything else is a 500
whose details stay in the server log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from kvrelay.frontend.detokenizer import IncrementalDetokenizer
from kvrelay.frontend.errors import NoWorker, WorkerRejected
from kvrelay.frontend.metrics import FrontendMetrics
from kvrelay.frontend.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    check_token_ids,
    generation_defaults,
)
from kvrelay.frontend.service import FrontendService, WorkerPin
from kvrelay.frontend.structured_request import GrammarChecks, StructuredError
from kvrelay.frontend.tokenizer import ChatTemplateError, Tokenizer
from kvrelay.frontend.tool_parsers import ToolCallFormat, pick_format
from kvrelay.frontend.tool_prompt import template_inputs
from kvrelay.frontend.tool_request import ToolRequest
from kvrelay.runtime.rpc import RpcError
from kvrelay.workers.api.endpoints import ErrorKind
from kvrelay.workers.api.messages import EngineRequest, ModelCard, SamplingParams, TopLogprobs
from kvrelay.workers.api.structured import StructuredOutput

log = logging.getLogger(__name__)

# What a worker's refusal means for the client: its mistake (400); anything else the engine raised is the
# server's failure (500), never the client's. A full queue is `ApiError.server_busy` (429, Retry-After).
_REJECTED_STATUS: dict[str, int] = {ErrorKind.ENGINE_ERROR: 400}
_REJECTED_TYPE = {400: "invalid_request_error"}
_REJECTED_CODE = {400: "engine_rejected"}


@dataclass
class Piece:
    """A step of the response: new text, the tokens behind it, and the finish reason on the last."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None
    top_logprobs: list[TopLogprobs] | None = None  # per token, when the request asked for alternatives
    choice: int = 0  # which of the request's n choices (choices.py)
    more: bool = False  # on a finished piece: other choices are still running (the stream goes on)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Prepared:
    model: str
    card: ModelCard
    tokenizer: Tokenizer
    request: EngineRequest
    stops: list[str]
    skip_special_tokens: bool
    arrival: float = field(default_factory=time.monotonic)  # when the HTTP request arrived (monotonic)
    first_token_at: float | None = None  # when the first token reached the frontend (the access log's TTFT)
    tool_format: ToolCallFormat | None = None  # set when the output is parsed for tool calls
    max_tool_calls: int | None = None  # 1 with parallel_tool_calls false
    # A named tool_choice: its call finishes with "stop", not "tool_calls" (OpenAI's and vLLM's rule).
    named_tool_choice: bool = False
    n: int = 1  # choices asked for (choices.py runs n > 1)
    pin: WorkerPin | None = None  # set on each choice's copy: all n go to one worker
    usage: Usage = field(init=False)

    def __post_init__(self) -> None:
        self.usage = Usage(prompt_tokens=len(self.request.prompt_token_ids))


class Pipeline:
    def __init__(self, service: FrontendService, metrics: FrontendMetrics):
        self.service, self.metrics = service, metrics
        self._tokenizers: dict[str, Tokenizer] = {}
        self._defaults: dict[str, dict] = {}
        self._tool_formats: dict[str, ToolCallFormat] = {}
        self.grammar_checks = GrammarChecks()  # a schema that cannot compile is the client's 400, here

    def tokenizer(self, card: ModelCard) -> Tokenizer:
        tok = self._tokenizers.get(card.fingerprint)
        if tok is None:
            tok = self._tokenizers[card.fingerprint] = Tokenizer(self.service.card_dir(card))
        return tok

    def tool_format(self, card: ModelCard, tok: Tokenizer) -> ToolCallFormat:
        """The model's tool-call format (`--tool-call-parser`, or picked from its template), logged once."""
        fmt = self._tool_formats.get(card.fingerprint)
        if fmt is None:
            fmt, why = pick_format(self.service.cfg.tool_call_parser, tok.template_source(tools=True))
            self._tool_formats[card.fingerprint] = fmt
            log.info("model %s: tool calls in %s format (%s)", card.name, fmt.name, why)
        return fmt

    async def announce_models(self) -> None:
        """Load each served model's tokenizer now and log its tool-call format (startup; otherwise both
        happen at the model's first request). A model whose card cannot be fetched is left for then."""
        for model in self.service.models():
            try:
                card = await self.service.model_card(model)
            except NoWorker:
                continue
            self.tool_format(card, self.tokenizer(card))

    async def resolve_model(self, model: str) -> ModelCard:
        svc = self.service
        if not svc.has_workers() or model in svc.cards:  # starting up, or a known model restarting
            await svc.wait_for_model(model)
        if model not in svc.models():
            if not svc.has_workers() or model in svc.cards:
                raise ApiError.no_worker(model)
            raise ApiError.model_not_found(model)
        try:
            return await svc.model_card(model)
        except NoWorker:
            raise ApiError.no_worker(model) from None

    async def prepare(self, req: ChatCompletionRequest | CompletionRequest, request_id: str,
                      arrival: float | None = None) -> Prepared:
        req.validate()
        card = await self.resolve_model(req.model)
        tok = self.tokenizer(card)
        try:
            tools: ToolRequest | None = None
            if isinstance(req, ChatCompletionRequest):
                tools, fmt = req.tool_request(), self.tool_format(card, tok)
                messages, template_tools = template_inputs(req.message_dicts(), tools.template_tools(),
                                                           tok.template_source(tools=bool(tools.tools)), fmt)
                prompt = tok.chat_prompt_ids(messages, add_generation_prompt=req.add_generation_prompt,
                                             tools=template_tools)
            elif isinstance(req.prompt, str):
                prompt = tok.encode(req.prompt)
            else:  # token ids (validated: a non-empty flat list of ints)
                prompt = list(req.prompt)
                check_token_ids(prompt, tok.vocab_size, "prompt")
        except ChatTemplateError as e:
            raise ApiError.bad_request(f"The chat template rejected the messages: {e}", "messages") from None
        if not prompt:
            raise ApiError.bad_request("The prompt is empty.", "prompt")
        check_token_ids(req.stop_token_ids or [], tok.vocab_size, "stop_token_ids")
        check_token_ids(list(req.logit_bias_ids), tok.vocab_size, "logit_bias")
        defaults = self._defaults.get(card.fingerprint)
        if defaults is None:
            defaults = self._defaults[card.fingerprint] = generation_defaults(tok.generation_config)
        constraint = req.constraint()
        if tools is not None and tools.forced:
            if constraint is not None:
                raise ApiError.bad_request(f"Invalid 'tool_choice': a forced tool call conflicts with "
                                           f"'{constraint[1]}'.", "tool_choice")
            parallel = tools.parallel and tools.mode == "required"
            constraint = StructuredOutput(kind="grammar", spec=fmt.forced_grammar(tools.forced, parallel),
                                          structural_tag=fmt.forced_structural_tag(tools.forced, parallel)), "tools"
        if constraint is not None:
            try:
                self.grammar_checks.check(*constraint)
            except StructuredError as e:
                raise ApiError.bad_request(f"Invalid '{e.param}': {e}", param=e.param) from None
        sampling = SamplingParams(**req.sampling_kwargs(len(prompt), card.max_model_len, defaults),
                                  structured=constraint[0] if constraint is not None else None)
        engine_req = EngineRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling,
                                   cache_salt=req.cache_salt or "")
        parses = tools is not None and tools.parses_calls
        return Prepared(req.model, card, tok, engine_req, req.stop_list, req.skip_special_tokens,
                        arrival if arrival is not None else time.monotonic(),
                        tool_format=fmt if parses else None,
                        max_tool_calls=None if tools is None or tools.parallel else 1,
                        named_tool_choice=tools is not None and tools.mode == "named", n=req.n)

    async def run(self, p: Prepared, count_prompt: bool = True) -> AsyncGenerator[Piece, None]:
        """Stream the response; the last piece has finish_reason. Raises ApiError on failure.
        `count_prompt` False: another choice of the same request counted the prompt (metrics)."""
        detok = IncrementalDetokenizer(p.tokenizer, p.request.prompt_token_ids,
                                       skip_special_tokens=p.skip_special_tokens, stop=p.stops,
                                       min_tokens=p.request.sampling.min_tokens)
        stop_ids = set(p.request.sampling.stop_token_ids) | p.tokenizer.eos_token_ids
        start = p.arrival
        first = True
        if count_prompt:
            self.metrics.prompt_tokens.inc(p.usage.prompt_tokens)
        last = time.monotonic()
        self.metrics.queue.observe(last - start)
        try:
            async for out in self.service.generate(p.model, p.card, p.request, p.pin):
                now = time.monotonic()
                if first:
                    p.first_token_at = now
                    self.metrics.ttft.observe(now - start)
                    p.usage.cached_tokens = out.num_cached_tokens
                    self.metrics.cached_tokens.inc(out.num_cached_tokens)
                    first = False
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                p.usage.completion_tokens += len(out.token_ids)
                self.metrics.completion_tokens.inc(len(out.token_ids))
                ended_by_token = (out.finish_reason == "stop" and bool(out.token_ids)
                                  and out.token_ids[-1] in stop_ids)
                delta = detok.step(out.token_ids, stop_token=ended_by_token)
                if delta.stopped:  # a stop string: end here; leaving the loop cancels the worker's request
                    yield Piece(delta.text, out.token_ids, out.logprobs, "stop", out.top_logprobs)
                    return
                if out.finish_reason is not None:
                    tail = detok.finish()
                    reason = "length" if out.finish_reason == "length" else "stop"
                    yield Piece(delta.text + tail.text, out.token_ids, out.logprobs, reason, out.top_logprobs)
                    return
                yield Piece(delta.text, out.token_ids, out.logprobs, None, out.top_logprobs)
        except NoWorker:
            raise ApiError.no_worker(p.model) from None
        except WorkerRejected as e:
            if e.kind == ErrorKind.ENGINE_OVERLOADED:
                raise ApiError.server_busy(str(e)) from None
            status = _REJECTED_STATUS.get(e.kind, 500)
            raise ApiError(status, str(e), type=_REJECTED_TYPE.get(status, "server_error"),
                           code=_REJECTED_CODE.get(status, "engine_error")) from None
        except RpcError as e:
            raise ApiError.worker_failed(str(e)) from None
        finally:
            self.metrics.e2e.observe(time.monotonic() - start)

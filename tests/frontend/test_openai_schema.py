"""OpenAI requests (validation -> status + param) and responses (parsed by the `openai` client's types)."""

from __future__ import annotations

import json

import pytest

from kvrelay.frontend import openai_responses as R
from kvrelay.frontend.openai_schema import (
    ApiError,
    check_token_ids,
    generation_defaults,
    parse_chat_request,
    parse_completion_request,
)
from kvrelay.workers.api.messages import SamplingParams

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MSG = [{"role": "user", "content": "Hi"}]


def chat(**kw) -> bytes:
    return json.dumps({"model": "m", "messages": MSG, **kw}).encode()


def comp(**kw) -> bytes:
    return json.dumps({"model": "m", "prompt": "Hi", **kw}).encode()


BAD = [
    (b"{not json", None), (b"[1, 2]", None), (b"", None),
    (json.dumps({"messages": MSG}).encode(), "model"),
    (chat(max_tokens="ten"), "max_tokens"), (chat(max_tokens=0), "max_tokens"), (chat(max_tokens=-5), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"), (chat(max_tokens=1.5), "max_tokens"),
    (chat(temperature=2.5), "temperature"), (chat(temperature=-0.1), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"), (chat(top_p=1.01), "top_p"), (chat(top_k=-2), "top_k"),
    (chat(seed="x"), "seed"), (chat(n=17), "n"), (chat(n=0), "n"), (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(stop=[""]), "stop"), (chat(stop=5), "stop"), (chat(stop_token_ids=[-1]), "stop_token_ids[0]"),
    (chat(ignore_eos="yes"), "ignore_eos"), (chat(user=5), "user"), (chat(cache_salt=""), "cache_salt"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(top_logprobs=2), "top_logprobs"), (chat(top_logprobs=0), "top_logprobs"),
    (chat(top_logprobs=21, logprobs=True), "top_logprobs"), (chat(top_logprobs=-1, logprobs=True), "top_logprobs"),
    (chat(logprobs=3), "logprobs"),
    (chat(repetition_penalty=0), "repetition_penalty"), (chat(repetition_penalty=-1), "repetition_penalty"),
    (chat(repetition_penalty="x"), "repetition_penalty"), (b'{"model": "m", "messages": [{"role": "user",'
                                                         b' "content": "Hi"}], "repetition_penalty": 1e999}',
                                                         "repetition_penalty"),
    (chat(frequency_penalty=2.5), "frequency_penalty"), (chat(frequency_penalty=-2.01), "frequency_penalty"),
    (chat(presence_penalty=3), "presence_penalty"), (chat(presence_penalty=-3), "presence_penalty"),
    (chat(min_p=1.5), "min_p"), (chat(min_p=-0.1), "min_p"),
    (chat(logit_bias={"5": 101}), "logit_bias"), (chat(logit_bias={"5": -100.5}), "logit_bias"),
    (chat(logit_bias={"x": 1}), "logit_bias"), (chat(logit_bias={"-1": 1}), "logit_bias"),
    (chat(logit_bias={" 5": 1}), "logit_bias"), (chat(logit_bias={"99999999999": 1}), "logit_bias"),
    (chat(logit_bias={"5": "a"}), "logit_bias"), (chat(logit_bias=[1]), "logit_bias"),
    (chat(min_tokens=-1), "min_tokens"), (chat(min_tokens="2"), "min_tokens"),
    (chat(messages=[]), "messages"), (chat(messages="hi"), "messages"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[MSG[0], {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
     "messages[1].content[0].type"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text"),
    (chat(response_format={"type": "xml"}), "response_format"),
    (chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format.json_schema.name"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "a"}}),
     "response_format.json_schema.schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}),
     "response_format.json_schema.schema"),
    (chat(response_format={"type": "json_object"}, guided_regex="a+"), "guided_regex"),
    (comp(structured_outputs={"choice": []}), "structured_outputs.choice"),
    (comp(structured_outputs={"regex": "a", "choice": ["a"]}), "structured_outputs"),
    (comp(structured_outputs={"structural_tag": "{}"}), "structured_outputs.structural_tag"),
    (comp(structured_outputs={"json_object": False}), "structured_outputs.json_object"),
    (comp(guided_json="{not json"), "guided_json"), (comp(guided_choice=["a", 1]), "guided_choice[1]"),
    (comp(guided_json={"type": "object"}, guided_choice=["a"]), "guided_choice"),
    (chat(tool_choice="required"), "tool_choice"),
    (comp(prompt=["a", "b"]), "prompt"), (comp(prompt=[[1, 2], [3]]), "prompt"), (comp(prompt=[]), "prompt"),
    (comp(prompt=[1, True]), "prompt"), (comp(prompt=[1, -2]), "prompt"), (comp(prompt=None), "prompt"),
    (comp(logprobs=True), "logprobs"), (comp(logprobs=21), "logprobs"), (comp(logprobs=-1), "logprobs"),
    (comp(frequency_penalty=9), "frequency_penalty"), (comp(logit_bias={"1": 200}), "logit_bias"),
    (comp(min_p=2), "min_p"), (comp(repetition_penalty=0.0), "repetition_penalty"),
    (comp(echo=True), "echo"), (comp(best_of=3), "best_of"), (comp(suffix="x"), "suffix"),
    (comp(n=2, best_of=1), "best_of"),
    (comp(max_tokens=0), "max_tokens"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
def test_rejections_are_400_naming_the_field(body, param):
    parse = parse_chat_request if b'"messages"' in body else parse_completion_request
    with pytest.raises(ApiError) as info:
        parse(body)
    err = info.value
    assert (err.status, err.param) == (400, param), err.message
    body = json.loads(err.body())
    assert body == {"error": {"message": err.message, "type": "invalid_request_error", "param": param,
                              "code": None}}
    assert f"'{param}'" in err.message if param else err.message


def test_valid_chat_request_and_sampling():
    req = parse_chat_request(chat(
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "a"}]},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {
                      "name": "f", "arguments": '{"a": 1}'}}]}, {"role": "tool", "content": "r", "tool_call_id": "1"}],
        max_completion_tokens=7, max_tokens=99, temperature=0, top_p=0.5, top_k=-1, seed=3, stop="###",
        stop_token_ids=[5], ignore_eos=True, logprobs=True, top_logprobs=3, user="u", cache_salt="salt",
        stream=True, stream_options={"include_usage": True}, frequency_penalty=0.5, presence_penalty=-1,
        repetition_penalty=1.1, min_p=0.05, logit_bias={"7": 100, "0012": -2.5}, min_tokens=2,
        metadata={"x": 1}, unknown_extra={"ignored": True}))
    assert req.include_usage and req.stop_list == ["###"] and req.cache_salt == "salt" and req.user == "u"
    assert req.message_dicts() == [
        {"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "content": None, "tool_calls": [  # arguments decoded for the template
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "r", "tool_call_id": "1"}]
    kw = req.sampling_kwargs(prompt_tokens=10, max_model_len=100)
    assert kw == {"max_tokens": 7, "min_tokens": 2, "temperature": 0.0, "top_p": 0.5, "top_k": 0, "min_p": 0.05,
                  "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": -1.0,
                  "logit_bias": {7: 100.0, 12: -2.5}, "seed": 3, "stop_token_ids": [5], "ignore_eos": True,
                  "logprobs": True, "top_logprobs": 3}
    SamplingParams(**kw).validate(vocab_size=100)
    with pytest.raises(ApiError) as info:  # more than the completion may have
        parse_chat_request(chat(min_tokens=8, max_tokens=7)).sampling_kwargs(10, 100)
    assert (info.value.status, info.value.param) == (400, "min_tokens")
    with pytest.raises(ApiError) as info:  # without max_tokens, the rest of the context bounds it
        parse_chat_request(chat(min_tokens=91)).sampling_kwargs(10, 100)
    assert info.value.param == "min_tokens"


def test_defaults_and_context_length():
    c = parse_completion_request(comp(prompt=[1, 2, 3]))
    assert c.prompt_token_ids == [1, 2, 3] and not c.stream and not c.include_usage
    kw = c.sampling_kwargs(3, 4096, generation_defaults({"do_sample": False}))
    assert (kw["max_tokens"], kw["temperature"], kw["logprobs"]) == (16, 0.0, False)  # OpenAI's 16
    assert parse_completion_request(comp(logprobs=0)).sampling_kwargs(3, 100)["logprobs"] is True
    assert parse_completion_request(comp(logprobs=0)).sampling_kwargs(3, 100)["top_logprobs"] == 0
    assert parse_completion_request(comp(logprobs=5)).sampling_kwargs(3, 100)["top_logprobs"] == 5
    assert (kw["repetition_penalty"], kw["frequency_penalty"], kw["min_p"], kw["logit_bias"]) == (1.0, 0.0, 0.0, {})
    assert generation_defaults({"do_sample": False, "repetition_penalty": 1.1, "top_p": 0.5}) == {
        "repetition_penalty": 1.1, "temperature": 0.0}  # as vLLM, the model's repetition_penalty applies
    ch = parse_chat_request(chat())
    assert ch.sampling_kwargs(10, 100, {"temperature": 0.6, "top_k": 20})["max_tokens"] == 90  # rest of context
    assert ch.sampling_kwargs(10, 100, {"temperature": 0.6, "top_k": 20})["temperature"] == 0.6
    assert ch.sampling_kwargs(10, 100)["temperature"] == 1.0  # OpenAI's default
    with pytest.raises(ApiError) as info:
        parse_chat_request(chat(max_tokens=91)).sampling_kwargs(10, 100)
    assert (info.value.status, info.value.param, info.value.code) == (400, "messages", "context_length_exceeded")
    assert "maximum context length is 100" in info.value.message
    with pytest.raises(ApiError) as info:
        c.sampling_kwargs(4096, 4096)
    assert info.value.param == "prompt"
    with pytest.raises(ApiError) as info:
        check_token_ids([1, 2048], 2048, "prompt")
    assert info.value.param == "prompt" and "2048" in info.value.message
    assert generation_defaults({"temperature": 0.7, "top_p": 0.8, "eos_token_id": 3}) == {"temperature": 0.7,
                                                                                          "top_p": 0.8}


def test_response_bodies_parse_with_openai_types():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    u = R.usage(12, 3, cached_tokens=8)
    lps = R.chat_logprobs([b"Hi", b"\xe4\xb8", b"!"], [-0.1, float("-inf"), float("nan")])
    body = json.loads(R.encode(R.chat_completion("m", "Hi!", "stop", u, lps)))
    parsed = ChatCompletion.model_validate(body)
    assert parsed.object == "chat.completion" and parsed.choices[0].message.content == "Hi!"
    assert parsed.choices[0].message.role == "assistant" and parsed.choices[0].finish_reason == "stop"
    assert parsed.usage.prompt_tokens_details.cached_tokens == 8 and parsed.usage.total_tokens == 15
    content = parsed.choices[0].logprobs.content
    assert [c.bytes for c in content] == [[72, 105], [0xE4, 0xB8], [33]] and content[1].logprob == -9999.0
    assert content[0].top_logprobs == [] and parsed.id.startswith("chatcmpl-")

    ck = R.ChatChunker("m", include_usage=True)
    chunks = [ck.role(), ck.content("Hi", lps), ck.content("", finish_reason="length"), ck.usage(u)]
    raw = [json.loads(R.encode(c)) for c in chunks]
    assert raw[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [r["usage"] for r in raw[:3]] == [None] * 3 and raw[3]["choices"] == []
    assert raw[2]["choices"][0]["delta"] == {} and len({r["id"] for r in raw}) == 1
    for r in raw:
        assert ChatCompletionChunk.model_validate(r).object == "chat.completion.chunk"
    assert "usage" not in json.loads(R.encode(R.ChatChunker("m").content("x")))

    clp = R.completion_logprobs(["Hel", "lo"], [-1.0, -0.5], offset=4)
    parsed = Completion.model_validate(json.loads(R.encode(R.completion("m", "Hello", "length", u, clp))))
    assert parsed.object == "text_completion" and parsed.choices[0].text == "Hello"
    assert parsed.choices[0].logprobs.text_offset == [4, 7] and parsed.choices[0].logprobs.tokens == ["Hel", "lo"]
    assert parsed.choices[0].logprobs.top_logprobs == [{"Hel": -1.0}, {"lo": -0.5}]
    assert parsed.usage.prompt_tokens_details.cached_tokens == 8


def test_top_logprobs_bodies_parse_with_openai_types():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    u = R.usage(4, 2)
    top = [[(b"Hi", -0.1), (b"Yo", -2.5)], [(b"!", -0.3), (b"\xe4\xb8", float("-inf"))]]
    lps = R.chat_logprobs([b"Hi", b"!"], [-0.1, -0.3], top)
    content = ChatCompletion.model_validate(json.loads(R.encode(R.chat_completion("m", "Hi!", "stop", u, lps)))
                                            ).choices[0].logprobs.content
    assert [[(t.token, t.logprob, t.bytes) for t in c.top_logprobs] for c in content] == [
        [("Hi", -0.1, [72, 105]), ("Yo", -2.5, [89, 111])], [("!", -0.3, [33]), ("\ufffd", -9999.0, [0xE4, 0xB8])]]
    # completions: the top tokens and the sampled one (outside the top here, as vLLM lists it)
    clp = R.completion_logprobs(["Hel", "lo"], [-1.0, -3.0], top=[[("Hel", -1.0), ("He", -1.5)], [("p", -0.2)]])
    parsed = Completion.model_validate(json.loads(R.encode(R.completion("m", "Hello", "length", u, clp))))
    assert parsed.choices[0].logprobs.top_logprobs == [{"Hel": -1.0, "He": -1.5}, {"p": -0.2, "lo": -3.0}]


def client_for(routes: dict[str, tuple[int, bytes, str]]):
    """An `openai.OpenAI` client whose HTTP calls return canned bodies (no server, no network)."""
    seen: list[dict] = []

    def handler(request):
        seen.append(json.loads(request.content))
        status, body, ctype = routes[request.url.path]
        return httpx.Response(status, content=body, headers={"content-type": ctype})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    return openai.OpenAI(api_key="k", base_url="http://test/v1", http_client=http, max_retries=0), seen


def test_openai_client_reads_streams_and_errors():
    u = R.usage(5, 2, 4)
    ck = R.ChatChunker("m", include_usage=True)
    chat_sse = b"".join(R.sse(c) for c in (ck.role(), ck.content("Hel"), ck.content("lo"),
                                           ck.content("", finish_reason="stop"), ck.usage(u))) + R.SSE_DONE
    cc = R.CompletionChunker("m")
    comp_sse = b"".join(R.sse(c) for c in (cc.text("a"), cc.text("b", finish_reason="length"))) + R.SSE_DONE
    client, seen = client_for({"/v1/chat/completions": (200, chat_sse, "text/event-stream"),
                               "/v1/completions": (200, comp_sse, "text/event-stream")})
    chunks = list(client.chat.completions.create(model="m", messages=MSG, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # What the client sends must parse too (it is the other half of the contract).
    assert parse_chat_request(json.dumps(seen[0]).encode()).include_usage
    texts = [c.choices[0].text for c in client.completions.create(model="m", prompt="x", stream=True)]
    assert texts == ["a", "b"]
    assert parse_completion_request(json.dumps(seen[1]).encode()).stream

    errors = [(ApiError.bad_request("bad", "max_tokens"), openai.BadRequestError),
              (ApiError.model_not_found("nope"), openai.NotFoundError),
              (ApiError.invalid_api_key(), openai.AuthenticationError),
              (ApiError.no_worker("m"), openai.InternalServerError),
              (ApiError.context_length_exceeded(10, 8, 5), openai.BadRequestError)]
    for err, exc in errors:
        client, _ = client_for({"/v1/chat/completions": (err.status, err.body(), "application/json")})
        with pytest.raises(exc) as info:
            client.chat.completions.create(model="m", messages=MSG)
        assert info.value.status_code == err.status and info.value.param == err.param
        assert info.value.code == err.code and err.message in str(info.value)
    assert R.sse(ApiError.no_worker("m")).startswith(b'data: {"error":')

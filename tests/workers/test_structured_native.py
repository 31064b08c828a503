"""Structured outputs on the native engine (tiny random-weight model, temperature 1: the grammar alone
makes the output valid): JSON schemas parse and validate, regex and choice constrain, rows without a
constraint sample exactly what they would alone, a complete grammar ends the request, a migrated request
continues its grammar, bad constraints are refused before they hold anything, and compiles are cached."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kvrelay.frontend.tokenizer import Tokenizer
from kvrelay.perf.structured_schemas import SCHEMAS
from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.api.structured import StructuredOutput, json_schema_output
from kvrelay.workers.engines.native import LLMEngine, NativeEngine, NativeEngineConfig
from kvrelay.workers.engines.native.grammar_cache import GrammarCache
from kvrelay.workers.models.registry import resolve_model

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(resolve_model("tiny").path)


@pytest.fixture(scope="module")
def engine(tiny) -> LLMEngine:
    return LLMEngine(NativeEngineConfig(model=tiny, num_blocks=1024))


@pytest.fixture(scope="module")
def tok(tiny) -> Tokenizer:
    return Tokenizer(tiny)


def run(engine: LLMEngine, requests: dict[str, SamplingParams], prompt: list[int],
        prior: dict[str, list[int]] | None = None) -> dict[str, tuple[list[int], str]]:
    """Every request to its end, batched; compiles first as NativeEngine does. -> (tokens, finish reason)."""
    prior = prior or {}
    for rid, sp in requests.items():
        if sp.structured is not None:
            engine.grammars.compile(sp.structured)
        engine.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt + prior.get(rid, []), sampling=sp,
                                         prior_output_tokens=len(prior.get(rid, []))))
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    reasons: dict[str, str] = {}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.token_ids
            if o.finish_reason is not None:
                reasons[o.request_id] = o.finish_reason
    assert not engine.take_failed()
    return {rid: (out[rid], reasons[rid]) for rid in requests}


def sampled(structured: StructuredOutput | None, seed: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 400), temperature=1.0, seed=seed, structured=structured, **kw)


def test_json_schema_outputs_parse_and_validate(engine, tok):
    assert len(SCHEMAS) >= 20
    requests = {f"{i}-{seed}": sampled(json_schema_output(s), seed) for i, s in enumerate(SCHEMAS) for seed in SEEDS}
    results = run(engine, requests, tok.encode("Answer in JSON."))
    for rid, (tokens, reason) in results.items():
        schema = SCHEMAS[int(rid.split("-")[0])]
        text = tok.decode(tokens)
        assert reason == "stop", (rid, text)
        jsonschema.validate(json.loads(text), schema)
    texts = {rid: tok.decode(t) for rid, (t, _) in results.items()}
    assert len({texts[f"0-{s}"] for s in SEEDS}) > 1  # sampled, not forced: seeds differ


@pytest.mark.parametrize("pattern", [r"[a-c]{3,6}", r"(cat|dog)s? [0-9]{1,3}", r"[A-Z][a-z]{1,4}\.", r"-?[0-9]+"])
def test_regex_constrains(engine, tok, pattern):
    results = run(engine, {str(s): sampled(StructuredOutput(kind="regex", spec=pattern), s, max_tokens=60)
                           for s in range(4)}, tok.encode("Say something."))
    for tokens, reason in results.values():
        text = tok.decode(tokens)
        assert re.fullmatch(pattern, text), text
        assert reason == "stop" or len(tokens) == 60  # `-?[0-9]+` may go on until max_tokens


def test_choice_constrains_and_a_complete_grammar_ends_the_request(engine, tok):
    choices = ("yes", "no", "maybe later", "absolutely not")
    c = StructuredOutput(kind="choice", choices=choices)
    results = run(engine, {str(s): sampled(c, s, ignore_eos=True, max_tokens=50) for s in range(8)},
                  tok.encode("Well?"))
    for tokens, reason in results.values():
        assert tok.decode(tokens) in choices
        assert reason == "stop" and len(tokens) < 50  # ended by the grammar, though ignore_eos is set


def test_json_object_is_an_object(engine, tok):
    results = run(engine, {str(s): sampled(StructuredOutput(kind="json_object"), s, max_tokens=80) for s in range(6)},
                  tok.encode("JSON:"))
    finished = [tok.decode(t) for t, reason in results.values() if reason == "stop"]
    assert finished  # with random weights an unbounded string may run to max_tokens; a finished one must parse
    for text in finished:
        assert isinstance(json.loads(text), dict)


def test_rows_without_a_constraint_sample_as_alone(engine, tok):
    prompt = tok.encode("Once upon a time")
    plain = {f"p{s}": sampled(None, s, max_tokens=20, ignore_eos=True) for s in range(3)}
    alone = run(engine, plain, prompt)
    mixed = run(engine, {**plain, **{f"c{s}": sampled(json_schema_output(SCHEMAS[0]), s) for s in range(3)}}, prompt)
    assert {rid: mixed[rid] for rid in plain} == alone


def test_a_migrated_request_continues_its_grammar(engine, tok):
    schema = SCHEMAS[12]  # an array of objects: the cut falls inside the structure
    prompt = tok.encode("Items:")
    whole, _ = run(engine, {"w": sampled(json_schema_output(schema), 5)}, prompt)["w"]
    cut = whole[:len(whole) // 2]
    rest, reason = run(engine, {"m": sampled(json_schema_output(schema), 6)}, prompt, prior={"m": cut})["m"]
    assert reason == "stop"
    jsonschema.validate(json.loads(tok.decode(cut + rest)), schema)


@pytest.mark.parametrize(("structured", "words"), [
    (StructuredOutput(kind="regex", spec="(ab"), "unclosed group"),
    (json_schema_output({"type": "frob"}), "frob"),
    (json_schema_output({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (StructuredOutput(kind="grammar", spec="start: undefined_rule"), "undefined_rule"),
])
async def test_bad_constraints_are_refused_before_posting(tiny, tok, structured, words):
    engine = NativeEngine(NativeEngineConfig(model=tiny, num_blocks=64))
    await engine.start()
    try:
        req = EngineRequest(request_id="bad", prompt_token_ids=tok.encode("x"),
                            sampling=SamplingParams(max_tokens=4, structured=structured))
        with pytest.raises(EngineError, match=words):
            async for _ in engine.generate(req):
                pass
        good = StructuredOutput(kind="choice", choices=("a", "b"))
        for i in range(2):  # compiled once, on the asyncio side, then reused
            req = EngineRequest(request_id=f"ok{i}", prompt_token_ids=tok.encode("x"),
                                sampling=SamplingParams(max_tokens=4, structured=good))
            text = tok.decode([t async for o in engine.generate(req) for t in o.token_ids])
            assert text in ("a", "b")
        assert engine.core is not None
        assert (engine.core.grammars.compiles, engine.core.grammars.inline_compiles) == (1, 0)
        assert engine.core.pool.num_free == engine.core.pool.num_blocks
    finally:
        await engine.close()


def test_grammar_cache_is_bounded_and_recompiles_what_it_evicted(tiny):
    from pathlib import Path

    cache = GrammarCache(Path(tiny) / "tokenizer.json", 2048, [1], capacity=2)
    a, b, c = (StructuredOutput(kind="choice", choices=(x,)) for x in "abc")
    for s in (a, b, a, c):  # b is the least recently used when c arrives
        cache.compile(s)
    assert (cache.cached(a), cache.cached(b), cache.cached(c), cache.compiles) == (True, False, True, 3)
    assert cache.matcher(b).is_accepting() is False and cache.inline_compiles == 1

"""The forced tool-call grammar (frontend/tool_parsers.py) as vLLM takes it: its `auto` structured-output
backend validates it with xgrammar, whose compiled grammar accepts a call of the tools and refuses an
argument the schema forbids. No engine is started (seconds, in the vLLM virtualenv)."""

from __future__ import annotations

import pytest

from kvrelay.frontend.tool_parsers import HERMES
from kvrelay.frontend.tool_request import tool_request

xgr = pytest.importorskip("xgrammar")
sampling_params = pytest.importorskip("vllm.sampling_params")
backend_xgrammar = pytest.importorskip("vllm.v1.structured_output.backend_xgrammar")

TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}]


def test_vllm_validates_and_xgrammar_enforces_the_forced_grammar():
    grammar = HERMES.forced_grammar(tool_request(TOOLS, "required", None).forced, parallel=True)
    params = sampling_params.SamplingParams(structured_outputs=sampling_params.StructuredOutputsParams(grammar=grammar))
    backend_xgrammar.validate_xgrammar_grammar(params)  # raises when vLLM would refuse the request
    compiled = xgr.Grammar.from_lark(grammar)
    ok = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>'
    assert xgr.testing._is_grammar_accept_string(compiled, ok)
    assert not xgr.testing._is_grammar_accept_string(compiled, ok.replace("utc", "pst"))
    assert not xgr.testing._is_grammar_accept_string(compiled, ok.replace("get_time", "get_date"))


@pytest.mark.parametrize(("mode", "name", "parallel"), [("required", None, True), ("required", None, False),
                                                        ("named", "get_time", True)])
def test_the_structural_tag_is_the_one_vllms_server_builds_for_strict_tools(mode, name, parallel):
    """On vLLM a forced call goes as a structural tag; with `strict` tools it is the tag vLLM's own hermes
    parser builds for the same request, so both servers write the same call token for token."""
    registry = pytest.importorskip("vllm.tool_parsers.structural_tag_registry")
    protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    req = tool_request(strict, {"type": "function", "function": {"name": name}} if name else mode,
                       None if parallel else False)
    many = req.parallel and req.mode == "required"  # a named choice is one call
    ours = HERMES.forced_structural_tag(req.forced, parallel=many)
    choice = (protocol.ChatCompletionNamedToolChoiceParam.model_validate(
        {"type": "function", "function": {"name": name}}) if name else mode)
    theirs = registry.get_model_structural_tag(
        "hermes", [protocol.ChatCompletionToolsParam.model_validate(t) for t in strict], choice, reasoning=False)
    if not parallel:
        theirs = registry.limit_to_single_tool_call(theirs)
    assert xgr.StructuralTag.model_validate_json(ours).model_dump() == theirs.model_dump()
    params = sampling_params.SamplingParams(
        structured_outputs=sampling_params.StructuredOutputsParams(structural_tag=ours))
    backend_xgrammar.validate_xgrammar_grammar(params)
    compiled = xgr.Grammar.from_structural_tag(ours)
    ok = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>'
    assert xgr.testing._is_grammar_accept_string(compiled, ok)
    assert not xgr.testing._is_grammar_accept_string(compiled, ok.replace("utc", "pst"))
    assert xgr.testing._is_grammar_accept_string(compiled, ok + ok) == many

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

"""kvrelay's SamplingParams -> vLLM's (workers/engines/vllm/sampling.py): every field reaches its vLLM
counterpart, and vLLM's per-position logprob dicts become `TopLogprobs`. No vLLM needed (the last test
builds the real object when it is installed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvrelay.workers.api.messages import SamplingParams, TopLogprobs
from kvrelay.workers.api.structured import StructuredOutput, json_schema_output
from kvrelay.workers.engines.vllm.sampling import structured_outputs_kwargs, to_output, vllm_sampling_kwargs

# vLLM's SamplingParams fields that the mapping may use (vllm/sampling_params.py, 0.8 - 0.11).
VLLM_FIELDS = {"n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
               "frequency_penalty", "presence_penalty", "logit_bias", "seed", "stop_token_ids", "ignore_eos",
               "logprobs", "detokenize", "skip_special_tokens", "extra_args", "structured_outputs"}
# vLLM's StructuredOutputsParams constraint fields (vllm/sampling_params.py, 0.10 - 0.32).
VLLM_STRUCTURED = {"json", "regex", "choice", "grammar", "json_object", "structural_tag"}  # StructuredOutputsParams fields

FULL = SamplingParams(max_tokens=20, min_tokens=5, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                      repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=-0.3, logit_bias={7: 2.5},
                      seed=11, stop_token_ids=[9], ignore_eos=True, logprobs=True, top_logprobs=4)


def test_every_sampling_field_is_passed_through():
    kw = vllm_sampling_kwargs(FULL)
    assert set(kw) <= VLLM_FIELDS
    assert kw == dict(n=1, max_tokens=20, min_tokens=5, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                      repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=-0.3, logit_bias={7: 2.5},
                      seed=11, stop_token_ids=[9], ignore_eos=True, logprobs=4, detokenize=False,
                      skip_special_tokens=False, extra_args=None, structured_outputs=None)
    plain = vllm_sampling_kwargs(SamplingParams())
    assert (plain["logprobs"], plain["logit_bias"], plain["top_k"], plain["min_tokens"]) == (None, None, 0, 0)
    assert vllm_sampling_kwargs(SamplingParams(logprobs=True))["logprobs"] == 0  # the chosen token's only


def test_tokens_already_generated_shrink_max_and_min_tokens():
    after_handoff = vllm_sampling_kwargs(FULL, already=1)  # the prefill worker sampled the first token
    assert (after_handoff["max_tokens"], after_handoff["min_tokens"]) == (19, 4)
    prefill = vllm_sampling_kwargs(FULL, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    assert (prefill["max_tokens"], prefill["min_tokens"]) == (1, 1)  # no EOS as the first token either
    assert prefill["extra_args"] == {"kv_transfer_params": {"do_remote_decode": True}}
    assert vllm_sampling_kwargs(SamplingParams(max_tokens=8, min_tokens=2), already=5)["min_tokens"] == 0


SCHEMA = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "integer"}}, "required": ["z"]}
CONSTRAINTS = [  # the schema's key order reaches vLLM: its grammar writes properties in that order
    (json_schema_output(SCHEMA),
     {"json": '{"type":"object","properties":{"z":{"type":"integer"},"a":{"type":"integer"}},"required":["z"]}'}),
    (StructuredOutput(kind="json_object"), {"json_object": True}),
    (StructuredOutput(kind="regex", spec="[a-z]+"), {"regex": "[a-z]+"}),
    (StructuredOutput(kind="choice", choices=("yes", "no")), {"choice": ["yes", "no"]}),
    (StructuredOutput(kind="grammar", spec='start: "a"'), {"grammar": 'start: "a"'}),
    # A forced tool call: vLLM gets the structural tag (its own server's form), never the Lark grammar.
    (StructuredOutput(kind="grammar", spec='start: "a"', structural_tag='{"type": "structural_tag"}'),
     {"structural_tag": '{"type": "structural_tag"}'}),
]


@pytest.mark.parametrize(("constraint", "expected"), CONSTRAINTS)
def test_each_constraint_is_one_structured_outputs_field(constraint, expected):
    kw = structured_outputs_kwargs(constraint)
    assert kw == expected and set(kw) <= VLLM_STRUCTURED
    assert vllm_sampling_kwargs(SamplingParams(structured=constraint))["structured_outputs"] == expected


def test_top_logprobs_come_from_vllms_ranked_dicts():
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731  # vLLM's Logprob
    # Position 0: the sampled token (5) is outside the top 2 and listed with its rank; position 1: inside.
    steps = [{5: lp(-3.0, 4), 8: lp(-0.5, 1), 2: lp(-1.0, 2)}, {3: lp(-0.2, 1), 4: lp(-2.0, 2)}]
    out = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 3], logprobs=steps, finish_reason=None)],
                          finished=False, num_cached_tokens=0)
    got = to_output("r", out, 10, top_logprobs=2)
    assert got.logprobs == [-3.0, -0.2]
    assert got.top_logprobs == [TopLogprobs([8, 2], [-0.5, -1.0]), TopLogprobs([3, 4], [-0.2, -2.0])]
    assert to_output("r", out, 10).top_logprobs is None


def test_the_real_vllm_accepts_the_mapping():
    pytest.importorskip("vllm")
    from kvrelay.workers.engines.vllm.sampling import to_vllm

    v = to_vllm(FULL)
    assert (v.min_p, v.repetition_penalty, v.frequency_penalty, v.presence_penalty, v.min_tokens, v.logprobs) == (
        0.05, 1.2, 0.5, -0.3, 5, 4)
    assert v.logit_bias == {7: 2.5}
    for constraint, expected in CONSTRAINTS:
        so = to_vllm(SamplingParams(structured=constraint)).structured_outputs
        assert {k: getattr(so, k) for k in expected} == expected

"""kvrelay's request -> vLLM's `SamplingParams`, and vLLM's `RequestOutput` -> kvrelay's `EngineOutput`.

Stop strings stay with the frontend (it detokenizes and cuts, for every engine alike); vLLM gets token
ids only and does not detokenize (`detokenize=False`): the worker spends no CPU on text nobody reads.
"""

from __future__ import annotations

from typing import Any

from kvrelay.workers.api.messages import EngineOutput, SamplingParams, TopLogprobs
from kvrelay.workers.api.structured import StructuredOutput


def vllm_sampling_kwargs(s: SamplingParams, *, already: int = 0, max_tokens: int | None = None,
                         kv_transfer_params: dict | None = None) -> dict[str, Any]:
    """The keyword arguments of vLLM's `SamplingParams` for `s`, every sampling field its own (vLLM applies
    them with the semantics the native engine copies). `already`: output tokens generated before this
    call (the handle's first token, sampled by the prefill worker): max_tokens and min_tokens shrink by
    it. `max_tokens` overrides the count (the prefill's single token); min_tokens never exceeds it."""
    count = max_tokens if max_tokens is not None else s.max_tokens - already
    return dict(
        n=1, max_tokens=count, min_tokens=min(max(s.min_tokens - already, 0), count),
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0, min_p=s.min_p,
        repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty, logit_bias=dict(s.logit_bias) or None, seed=s.seed,
        stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
        # vLLM returns the sampled token's logprob and the top `logprobs` (raw_logprobs, its default mode).
        logprobs=s.top_logprobs if s.logprobs else None, detokenize=False, skip_special_tokens=False,
        extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params is not None else None,
        structured_outputs=structured_outputs_kwargs(s.structured) if s.structured is not None else None)


def structured_outputs_kwargs(c: StructuredOutput) -> dict[str, Any]:
    """The keyword arguments of vLLM's `StructuredOutputsParams` (vllm/sampling_params.py, 0.10 - 0.32) for
    `c`: exactly one constraint field, as vLLM's own OpenAI server fills it from the same request. vLLM
    picks the grammar backend (its default `auto`: xgrammar, else llguidance, the native engine's). A
    constraint that carries a structural tag (a forced tool call) goes as that tag, the form vLLM's own
    server sends for the same request."""
    if c.structural_tag:
        return {"structural_tag": c.structural_tag}
    if c.kind == "json":
        return {"json": c.spec}  # the schema's JSON text: vLLM takes a str or a dict
    if c.kind == "json_object":
        return {"json_object": True}
    if c.kind == "choice":
        return {"choice": list(c.choices)}
    return {c.kind: c.spec}  # regex, grammar


def to_vllm(s: SamplingParams, *, already: int = 0, max_tokens: int | None = None,
            kv_transfer_params: dict | None = None) -> Any:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    kw = vllm_sampling_kwargs(s, already=already, max_tokens=max_tokens, kv_transfer_params=kv_transfer_params)
    structured = kw.pop("structured_outputs")
    if structured is not None:
        kw["structured_outputs"] = StructuredOutputsParams(**structured)
    return VllmSamplingParams(**kw, output_kind=RequestOutputKind.DELTA)


def to_output(request_id: str, out: Any, num_prompt_tokens: int, top_logprobs: int = 0) -> EngineOutput:
    """One delta `RequestOutput` as an `EngineOutput` (finish_reason None unless vLLM finished it);
    `top_logprobs`: how many of each position's most likely tokens the request asked for."""
    c = out.outputs[0]
    tokens = list(c.token_ids)
    logprobs, top = None, None
    if c.logprobs is not None:
        logprobs = [float(step[t].logprob) for step, t in zip(c.logprobs, tokens, strict=False)]
        if top_logprobs:
            top = [_top(step, top_logprobs) for step in c.logprobs]
    reason = c.finish_reason if out.finished else None
    return EngineOutput(request_id=request_id, token_ids=tokens, logprobs=logprobs, top_logprobs=top,
                        finish_reason=_REASONS.get(reason, reason), num_prompt_tokens=num_prompt_tokens,
                        num_cached_tokens=out.num_cached_tokens or 0)


def _top(step: dict[int, Any], k: int) -> TopLogprobs:
    """vLLM's logprobs of one position (token id -> Logprob with a 1-based `rank`; the sampled token is
    there too, ranked, even when outside the top k) as the k most likely."""
    best = sorted(step.items(), key=lambda item: item[1].rank)[:k]
    return TopLogprobs([t for t, _ in best], [float(lp.logprob) for _, lp in best])


_REASONS = {"abort": "abort", "stop": "stop", "length": "length", None: None}

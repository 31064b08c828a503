"""kvrelay's request -> vLLM's `SamplingParams`, and vLLM's `RequestOutput` -> kvrelay's `EngineOutput`.

Stop strings stay with the frontend (it detokenizes and cuts, for every engine alike); vLLM gets token
ids only and does not detokenize (`detokenize=False`): the worker spends no CPU on text nobody reads.
"""

from __future__ import annotations

from typing import Any

from kvrelay.workers.api.messages import EngineOutput, SamplingParams


def to_vllm(s: SamplingParams, *, max_tokens: int | None = None, kv_transfer_params: dict | None = None) -> Any:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=1, max_tokens=max_tokens if max_tokens is not None else s.max_tokens, temperature=s.temperature,
        top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0, seed=s.seed, stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos, logprobs=0 if s.logprobs else None, detokenize=False,
        skip_special_tokens=False, output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params is not None else None)


def to_output(request_id: str, out: Any, num_prompt_tokens: int) -> EngineOutput:
    """One delta `RequestOutput` as an `EngineOutput` (finish_reason None unless vLLM finished it)."""
    c = out.outputs[0]
    tokens = list(c.token_ids)
    logprobs = None
    if c.logprobs is not None:
        logprobs = [float(step[t].logprob) for step, t in zip(c.logprobs, tokens, strict=False)]
    reason = c.finish_reason if out.finished else None
    return EngineOutput(request_id=request_id, token_ids=tokens, logprobs=logprobs,
                        finish_reason=_REASONS.get(reason, reason), num_prompt_tokens=num_prompt_tokens,
                        num_cached_tokens=out.num_cached_tokens or 0)


_REASONS = {"abort": "abort", "stop": "stop", "length": "length", None: None}

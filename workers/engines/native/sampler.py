"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds; logprob of the chosen token.

Greedy rows are one vectorized argmax. Random rows are sampled per row because each request may own
its own seeded generator (reproducible regardless of what else is in the batch).
Logprobs are from the model's unmodified distribution (log_softmax of the raw logits), as OpenAI's
`logprobs` report them.

Sampling is total: a temperature below `SAMPLING_EPS` is greedy (as vLLM), the nucleus always keeps
the top token (a top_p that rounds to 0 in float32 would otherwise drop every token), and a row whose
distribution still comes out non-finite is reported in `failed` instead of raising, so one request's
parameters can never fail the other rows of its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvrelay.workers.api.messages import SamplingParams

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


class Sampled(NamedTuple):
    tokens: list[int]
    logprobs: list[float] | None  # only when some row asked
    failed: list[int]  # rows whose sampling failed; their tokens are meaningless


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p, and always the top token.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    probs = torch.softmax(_filter(logits / p.temperature, p.top_k, p.top_p), dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("non-finite sampling distribution")
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> Sampled:
    """logits: float32 [B, V]. Returns chosen token ids, their logprobs if any row asked, failed rows."""
    tokens = torch.argmax(logits, dim=-1)
    failed = []
    for row, p in enumerate(params):
        if p.temperature >= SAMPLING_EPS:
            try:
                tokens[row] = _sample_row(logits[row], p, generators[row])
            except (RuntimeError, ValueError):  # torch reports bad distributions as RuntimeError
                failed.append(row)
    chosen = tokens.tolist()
    if not any(p.logprobs for p in params):
        return Sampled(chosen, None, failed)
    lp = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return Sampled(chosen, lp.tolist(), failed)

"""Token sampling, in vLLM's order (its v1 sampler): the raw logprobs are taken first; then each row's
min_tokens, logit_bias and penalties (logits_processors.py); greedy rows take the argmax of that;
random rows are divided by their temperature, filtered by min_p (relative to the top token's
probability), then by top-k and top-p, and drawn from.

Logprobs (the chosen token's, and the `top_logprobs` most likely tokens') are from the model's
unmodified distribution, log_softmax of the raw logits, as vLLM's default `logprobs_mode`
("raw_logprobs") reports them: what the model thinks, whatever the request's penalties and temperature.

Everything but the draw is batched over the rows that need it; the draw is per random row because
each request may own its own seeded generator (reproducible regardless of what else is in the batch).

Sampling is total: a temperature below `SAMPLING_EPS` is greedy (as vLLM), the nucleus always keeps
the top token (a top_p that rounds to 0 in float32 would otherwise drop every token), and a row whose
distribution still comes out non-finite is reported in `failed` instead of raising, so one request's
parameters can never fail the other rows of its batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from kvrelay.workers.api.messages import SamplingParams, TopLogprobs
from kvrelay.workers.engines.native.logits_processors import SampledSequence, apply_logits_processors

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


class Sampled(NamedTuple):
    tokens: list[int]
    logprobs: list[float] | None  # only when some row asked
    failed: list[int]  # rows whose sampling failed; their tokens are meaningless
    top_logprobs: list[TopLogprobs | None] | None = None  # per row, for rows that asked top_logprobs > 0


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
    """One draw from `logits` (already divided by the temperature and filtered by min_p)."""
    probs = torch.softmax(_filter(logits, p.top_k, p.top_p), dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("non-finite sampling distribution")
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _temperature_and_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Rows divided by their temperature; with min_p, tokens whose probability is below min_p x the top
    token's are dropped (vLLM's min_p, applied after temperature)."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    scaled = logits / temps[:, None]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=logits.device)
        probs = torch.softmax(scaled, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        scaled = scaled.masked_fill(probs < threshold, float("-inf"))  # the top token is never below
    return scaled


def _top_logprobs(raw_logprobs: torch.Tensor, params: list[SamplingParams]) -> list[TopLogprobs | None] | None:
    k = max(p.top_logprobs for p in params)
    if not k:
        return None
    values, ids = torch.topk(raw_logprobs, k, dim=-1)
    values_l, ids_l = values.tolist(), ids.tolist()
    return [TopLogprobs(ids_l[r][:p.top_logprobs], values_l[r][:p.top_logprobs]) if p.top_logprobs else None
            for r, p in enumerate(params)]


def sample(logits: torch.Tensor, seqs: Sequence[SampledSequence], generators: list[torch.Generator | None],
           eos_ids: Iterable[int] = ()) -> Sampled:
    """logits: float32 [B, V], row i the next token of seqs[i] (modified in place). Returns the chosen
    token ids, their logprobs and top logprobs if any row asked, and the rows that failed."""
    params = [s.sampling for s in seqs]
    want_logprobs = any(p.logprobs for p in params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # before any processing
    apply_logits_processors(logits, seqs, eos_ids)
    tokens = torch.argmax(logits, dim=-1)
    failed = []
    random_rows = [i for i, p in enumerate(params) if p.temperature >= SAMPLING_EPS]
    if random_rows:
        scaled = _temperature_and_min_p(logits[random_rows], [params[i] for i in random_rows])
        for j, row in enumerate(random_rows):
            try:
                tokens[row] = _sample_row(scaled[j], params[row], generators[row])
            except (RuntimeError, ValueError):  # torch reports bad distributions as RuntimeError
                failed.append(row)
    chosen = tokens.tolist()
    if raw_logprobs is None:
        return Sampled(chosen, None, failed)
    lp = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    return Sampled(chosen, lp.tolist(), failed, _top_logprobs(raw_logprobs, params))

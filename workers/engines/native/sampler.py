"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds; logprob of the chosen token.

Greedy rows are one vectorized argmax. Random rows are sampled per row because each request may own
its own seeded generator (reproducible regardless of what else is in the batch).
Logprobs are from the model's unmodified distribution (log_softmax of the raw logits), as OpenAI's
`logprobs` report them.
"""

from __future__ import annotations

import torch

from kvrelay.workers.protocol import SamplingParams


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[float] | None]:
    """logits: float32 [B, V]. Returns chosen token ids and, if any row asked, their logprobs."""
    tokens = torch.argmax(logits, dim=-1)
    for row, p in enumerate(params):
        if p.temperature > 0:
            filtered = _filter(logits[row] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(filtered, dim=-1)
            tokens[row] = torch.multinomial(probs, 1, generator=generators[row]).item()
    chosen = tokens.tolist()
    if not any(p.logprobs for p in params):
        return chosen, None
    lp = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return chosen, lp.tolist()

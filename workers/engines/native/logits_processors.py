"""What a request does to its raw logits before temperature: `min_tokens`, `logit_bias`, and the
repetition, frequency and presence penalties, with vLLM's semantics and in vLLM's order (its v1
sampler: min-tokens and logit-bias processors, then penalties; temperature, min_p, top-k and top-p come
after, in sampler.py).

Batched: one index_put for every row's bias and banned tokens, and one set of [R, V] tensors for the R
rows that ask for a penalty, so the work is a few vectorized ops per step rather than a Python loop
over the vocabulary per sequence. Rows that ask for none of this are not touched, and a batch where no
row asks costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Protocol

import torch

from kvrelay.workers.api.messages import SamplingParams


class SampledSequence(Protocol):
    """What the processors read of a sequence (workers/core/sequence.py `Sequence` is one)."""

    sampling: SamplingParams
    prompt: list[int]
    output: list[int]

    @property
    def penalized_output(self) -> list[int]: ...


def apply_logits_processors(logits: torch.Tensor, seqs: Sequence[SampledSequence], eos_ids: Iterable[int]) -> None:
    """Apply, in place on float32 `logits` [B, V] (row i is seqs[i]'s next token), each row's
    min_tokens, logit_bias and penalties."""
    _bias_and_min_tokens(logits, seqs, frozenset(eos_ids))
    rows = [i for i, s in enumerate(seqs) if s.sampling.has_penalties]
    if rows:
        _penalties(logits, rows, [seqs[i] for i in rows])


def _bias_and_min_tokens(logits: torch.Tensor, seqs: Sequence[SampledSequence], eos_ids: frozenset[int]) -> None:
    bias_rows: list[int] = []
    bias_cols: list[int] = []
    bias_vals: list[float] = []
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, s in enumerate(seqs):
        p = s.sampling
        if p.logit_bias:
            bias_rows += [i] * len(p.logit_bias)
            bias_cols += p.logit_bias.keys()
            bias_vals += p.logit_bias.values()
        if len(s.output) < p.min_tokens:  # vLLM: no stop token while fewer than min_tokens were generated
            stops = set(p.stop_token_ids) if p.ignore_eos else eos_ids.union(p.stop_token_ids)
            ban_rows += [i] * len(stops)
            ban_cols += stops
    device = logits.device
    if bias_rows:  # ids are < vocab (EngineCore checks); a repeated id is not possible (dict keys)
        index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_cols, device=device))
        logits.index_put_(index, torch.tensor(bias_vals, dtype=logits.dtype, device=device), accumulate=True)
    if ban_rows:
        index = (torch.tensor(ban_rows, device=device), torch.tensor(ban_cols, device=device))
        logits.index_put_(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=device))


def _counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, vocab] int32: how often each id occurs in each list (one accumulating index_put)."""
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    ids = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.int64, device=device)
    counts = torch.zeros((len(token_lists), vocab), dtype=torch.int32, device=device)
    counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
    return counts


def _penalties(logits: torch.Tensor, rows: list[int], seqs: list[SampledSequence]) -> None:
    """vLLM's `apply_penalties`: a token seen in the prompt or output has a positive logit divided by the
    repetition penalty and a non-positive one multiplied by it; then logit -= frequency x (times it
    occurred in the output) + presence x (1 if it occurred in the output)."""
    device, vocab = logits.device, logits.shape[1]
    sub = logits[rows]
    out_counts = _counts([s.penalized_output for s in seqs], vocab, device)
    out_seen = out_counts > 0
    rep = torch.tensor([s.sampling.repetition_penalty for s in seqs], dtype=logits.dtype, device=device)
    if any(s.sampling.repetition_penalty != 1.0 for s in seqs):  # decided on the host: no device sync
        seen = out_seen | (_counts([s.prompt for s in seqs], vocab, device) > 0)
        factor = torch.where(seen, rep[:, None], torch.ones((), dtype=logits.dtype, device=device))
        sub = torch.where(sub > 0, sub / factor, sub * factor)
    freq = torch.tensor([s.sampling.frequency_penalty for s in seqs], dtype=logits.dtype, device=device)
    pres = torch.tensor([s.sampling.presence_penalty for s in seqs], dtype=logits.dtype, device=device)
    sub = sub - freq[:, None] * out_counts.to(logits.dtype) - pres[:, None] * out_seen.to(logits.dtype)
    logits[rows] = sub

"""`GrammarMask`: structured outputs in the native engine's step. Before sampling, every constrained row's
logits lose the tokens its grammar does not allow next; after sampling, each matcher is advanced with
its row's token, and a row whose grammar is complete ends the request (`stopped`).

Batched: the constrained rows' masks are one int32 bitmask [R, ceil(V/32)] filled by llguidance (in
parallel over its threads when R > 1), unpacked once to a bool [R, V] and applied with one masked_fill;
rows without a constraint are not touched, and a step with none costs one scan of the batch.

As vLLM does, the mask comes before the sampler: logprobs are those of the masked distribution, and
EOS is allowed only where the grammar may end (llguidance puts the tokenizer's EOS ids in the mask then).

Per-request state: one matcher per sequence, created when the sequence is first sampled from a copy of
the cached prototype (grammar_cache.py), fast-forwarded over the output it already has (a first token
from a prefill worker, or the tokens before a migration); held weakly, so it goes with its sequence.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.engines.native.grammar_cache import GrammarCache
from kvrelay.workers.engines.native.logits_processors import SampledSequence


class GrammarMask:
    def __init__(self, cache: GrammarCache):
        self.cache = cache
        self._matchers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._executor: Any = None  # llguidance.LLExecutor: the parallel mask fill, made on first need
        self._shifts: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, seqs: Sequence[SampledSequence]) -> tuple[list[int], list[int]]:
        """Mask `logits` [B, V] in place for the constrained rows. Returns (constrained rows, rows that
        failed: their matcher could not be made or is in error; those requests end alone)."""
        rows, matchers, failed = [], [], []
        for i, s in enumerate(seqs):
            if s.sampling.structured is None:
                continue
            m = self._matcher(s)
            if m is None or m.is_error():
                failed.append(i)
                continue
            rows.append(i)
            matchers.append(m)
        if not rows:
            return rows, failed
        vocab = logits.shape[1]
        words = (vocab + 31) // 32
        bitmask = torch.empty((len(rows), words), dtype=torch.int32)  # on the host: llguidance writes it
        if len(rows) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
        else:
            self._parallel().unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(),
                                                     words * 4, len(rows))
        if self._shifts is None or self._shifts.device != logits.device:
            self._shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        bits = (bitmask.to(logits.device).unsqueeze(-1) >> self._shifts) & 1  # bit k of word w: token 32w + k
        allowed = bits.view(len(rows), words * 32)[:, :vocab].bool()
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return rows, failed

    def advance(self, seqs: Sequence[SampledSequence], rows: list[int], tokens: list[int],
                failed: set[int]) -> tuple[list[int], list[int]]:
        """Feed each constrained row's sampled token to its matcher. Returns (rows whose grammar is now
        complete: the request ends, rows whose token the grammar refused: the request fails)."""
        stopped, refused = [], []
        for i in rows:
            if i in failed:
                continue
            m = self._matchers.get(seqs[i])
            if m is None or not m.consume_token(tokens[i]):
                refused.append(i)  # only a row whose every token was masked (a sampler failure) gets here
            elif m.is_stopped():
                stopped.append(i)
        return stopped, refused

    def _matcher(self, s: SampledSequence) -> Any:
        m = self._matchers.get(s)
        if m is not None:
            return m
        assert s.sampling.structured is not None
        try:
            m = self.cache.matcher(s.sampling.structured)
        except EngineError:
            return None
        prior = s.penalized_output  # output it already has: a prefill worker's first token, a migration's
        if prior and not m.consume_tokens(prior):
            return None
        self._matchers[s] = m
        return m

    def _parallel(self) -> Any:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

"""Deterministic fake tokens.

The token at position i is a function of (seed, every token before i) only: `MockSequence` keeps a
streaming xxh3 over seed ‖ prompt ‖ output (u32 LE), and `TokenSource` maps its digest to an id.
Consequences the tests and the frontend rely on:
- the same prompt gives the same completion on every worker and every run (same seed);
- a request migrated mid-stream (re-sent as prompt + tokens so far) continues with the very tokens
  the first worker would have produced, and preemption-by-recompute changes nothing;
- of the sampling parameters only max_tokens, min_tokens (no EOS before it), stop_token_ids, ignore_eos,
  logprobs and top_logprobs (the chosen token first, then made-up runners-up) have an effect; the token
  stream is not a model's distribution, so temperature, top-p/top-k, min_p, the penalties, logit_bias
  and the seed are accepted and ignored (README.md "Tokens").
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections.abc import Sequence as Seq

import xxhash

from kvrelay.kvbm.hashing import BlockHasher
from kvrelay.workers.api.messages import SamplingParams, TopLogprobs
from kvrelay.workers.core.sequence import Sequence

_MASK64 = (1 << 64) - 1


def _u32le(tokens: Seq[int]) -> bytes:
    arr = array("I", tokens)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


class TokenSource:
    """Maps a 64-bit hash to a token id, uniform over [0, vocab_size) minus `excluded`, and to a
    plausible logprob and an EOS coin flip from independent bits of the same hash."""

    def __init__(self, vocab_size: int, excluded: Seq[int], eos_ids: Seq[int], eos_probability: float):
        self.excluded = sorted({i for i in excluded if 0 <= i < vocab_size})
        self.vocab_size = vocab_size
        self.num_allowed = vocab_size - len(self.excluded)
        if self.num_allowed < 1:
            raise ValueError(f"no token id to generate: vocab {vocab_size}, {len(self.excluded)} excluded")
        self.eos = eos_ids[0] if eos_ids else None
        self._eos_threshold = int(eos_probability * (1 << 24))  # compared with 24 bits of the hash

    def token(self, h: int, ignore_eos: bool) -> int:
        if self.eos is not None and not ignore_eos and (h >> 40) < self._eos_threshold:
            return self.eos
        r = h % self.num_allowed
        # The r-th allowed id: shift r past every excluded id at or below it (excluded is sorted).
        lo = 0
        while True:
            k = bisect_right(self.excluded, r + lo)
            if k == lo:
                return r + lo
            lo = k

    @staticmethod
    def logprob(h: int) -> float:
        return -0.05 - ((h >> 16) & 0xFFFF) / 0xFFFF * 2.0  # in [-2.05, -0.05]

    def top_logprobs(self, h: int, token: int, k: int) -> TopLogprobs:
        """`k` alternatives: the chosen token with `logprob(h)` first (so the mocker looks greedy), then
        the ids after it, each 0.5 less likely than the one before."""
        first = self.logprob(h)
        return TopLogprobs([(token + j) % self.vocab_size for j in range(k)], [first - 0.5 * j for j in range(k)])


class MockSequence(Sequence):
    """A core `Sequence` that also carries the running hash its next token comes from."""

    def __init__(self, request_id: str, prompt: list[int], sampling: SamplingParams, hasher: BlockHasher,
                 arrival: int, seed: int):
        super().__init__(request_id, prompt, sampling, hasher, arrival)
        self.stream = xxhash.xxh3_64((seed & _MASK64).to_bytes(8, "little") + _u32le(prompt))

    def next_hash(self) -> int:
        """The hash that decides the token at position `num_tokens`."""
        return self.stream.intdigest()

    def append(self, token: int, logprob: float | None, top: TopLogprobs | None = None) -> None:
        super().append(token, logprob, top)
        self.stream.update(_u32le((token,)))

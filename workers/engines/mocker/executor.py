"""`MockExecutor`: the mocker's `Executor` (workers/core/executor.py): computes nothing; each sequence
whose scheduled tokens reach its end gets the deterministic token of `tokens.py`."""

from __future__ import annotations

from kvrelay.workers.core.executor import Scheduled, StepResult
from kvrelay.workers.core.sequence import Status
from kvrelay.workers.engines.mocker.tokens import MockSequence, TokenSource


class MockExecutor:
    def __init__(self, tokens: TokenSource):
        self.tokens = tokens

    def execute(self, scheduled: Scheduled) -> StepResult:
        # Skipped: sequences aborted while the step slept, and prefill chunks short of the prompt's end.
        seqs: list[MockSequence] = [s for s, n in scheduled  # type: ignore[misc]  # the core makes MockSequences
                                    if s.status is Status.RUNNING and s.num_computed + n >= s.num_tokens]
        hashes = [s.next_hash() for s in seqs]
        token, logprob = self.tokens.token, self.tokens.logprob
        # No EOS before min_tokens (as the native sampler masks it); a stop_token_id drawn by chance before
        # then is an ordinary token (Sequence.stop_reason).
        tokens = [token(h, s.sampling.ignore_eos or len(s.output) < s.sampling.min_tokens)
                  for h, s in zip(hashes, seqs, strict=True)]
        logprobs = [logprob(h) if s.sampling.logprobs else 0.0 for h, s in zip(hashes, seqs, strict=True)]
        top = None
        if any(s.sampling.top_logprobs for s in seqs):
            alternatives = self.tokens.top_logprobs
            top = [alternatives(h, t, s.sampling.top_logprobs) if s.sampling.top_logprobs else None
                   for h, t, s in zip(hashes, tokens, seqs, strict=True)]
        return StepResult(seqs, tokens, logprobs, (), top)  # type: ignore[arg-type]  # list is invariant; these are Sequences

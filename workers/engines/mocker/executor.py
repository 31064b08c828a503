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
        seqs: list[MockSequence] = []
        tokens: list[int] = []
        logprobs: list[float] = []
        for seq, n in scheduled:
            if seq.status is not Status.RUNNING or seq.num_computed + n < seq.num_tokens:
                continue  # aborted while the step slept, or a prefill chunk short of the prompt's end
            assert isinstance(seq, MockSequence)
            h = seq.next_hash()
            seqs.append(seq)
            tokens.append(self.tokens.token(h, seq.sampling.ignore_eos))
            logprobs.append(self.tokens.logprob(h))
        return StepResult(seqs, tokens, logprobs)  # type: ignore[arg-type]

"""`Executor`: the one thing an engine without its own scheduler supplies to the core. The core
schedules a step, the executor runs it (a model forward and sampling, or a timing model and a token
source) and says which sequences got which token; the core commits, stops, parks and emits outputs.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from kvrelay.workers.api.messages import TopLogprobs
from kvrelay.workers.core.sequence import Sequence

Scheduled = list[tuple[Sequence, int]]  # (sequence, tokens computed for it this step)


class StepResult(NamedTuple):
    seqs: list[Sequence]  # every scheduled sequence whose tokens reach its end, in any order
    tokens: list[int]  # the token sampled for seqs[i]
    logprobs: list[float] | None  # its logprob, or None when no sequence asked for logprobs
    failed: tuple[int, ...] = ()  # indices into seqs whose sampling failed: those requests end, alone
    top_logprobs: list[TopLogprobs | None] | None = None  # per seq, for those that asked top_logprobs > 0
    # indices into seqs whose output constraint is complete with this token (structured outputs): those
    # requests end with "stop" (nothing else could follow), whatever max_tokens, ignore_eos or min_tokens say
    stopped: tuple[int, ...] = ()


class Executor(Protocol):
    def execute(self, scheduled: Scheduled) -> StepResult:
        """Compute the step's KV (into the blocks each sequence holds) and sample. Must not touch the
        scheduler or the block pool."""
        ...

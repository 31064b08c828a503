"""The kv router's expected time to first token of a request on a worker (issue 27). Every term and its
source is listed in frontend/README.md "Routing"; in short, in prompt tokens converted to seconds by the
worker's prefill rate:

    ttft = (queued + uncached + onboard + RUNNING_TOKEN_EQUIV * active) / rate

- queued: prefill work ahead of the request on that worker: the prompt tokens of requests routed there
  (by this router and its peers) that have not produced a first token, each counted with the tokens the
  router expected it to compute, capped by what the worker can still be computing of the work routed to
  it (drained at `rate` since it was routed); or, when the worker's last load report says more are
  waiting, its waiting count times the mean tokens a routed request computes (`mean_prefill`), drained
  at `rate` since the report was taken.
- uncached: the prompt's tokens the worker does not hold in G1 (nor speculatively) nor in a weighted lower
  tier; at least 1 (an engine always computes the last token).
- onboard: blocks held only in a lower tier cost (1 - tier weight) of their prefill time to bring up.
- active: its running + waiting requests (reported, or in flight from the routers, whichever is larger);
  a decode beside the prefill lengthens each step by about one token's prefill
  (`RUNNING_TOKEN_EQUIV`, from the mocker's default timing: 20 us per decoding sequence and per prefill
  token, itself modeled on an 8B model on one H100).
- rate: `PrefillRate`, learned per worker from first-token times (prefill_rate.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from kvrelay.frontend.prefill_rate import PrefillRate
from kvrelay.frontend.speculative_index import Held

RUNNING_TOKEN_EQUIV = 1.0
MEAN_PREFILL_ALPHA = 0.05  # weight of one routed request in the running mean of tokens to compute


class TtftTerms(msgspec.Struct, frozen=True):
    """One worker's estimate, term by term (tokens, except `seconds`)."""

    queued: float
    uncached: int
    onboard: float
    active: int
    rate: float  # tokens/s

    @property
    def seconds(self) -> float:
        return (self.queued + self.uncached + self.onboard + RUNNING_TOKEN_EQUIV * self.active) / self.rate


class TtftModel:
    """Invariant: `_backlog[w]` = (tokens, at): the prefill work routed to `w` not yet drained at time `at`,
    the worker computing `rate` tokens/s of it from the moment it arrives (FIFO)."""

    def __init__(self, rate: PrefillRate | None = None, clock: Callable[[], float] = time.monotonic,
                 mean_prefill_prior: float = 256.0):
        self.rate = rate if rate is not None else PrefillRate()
        self.clock = clock
        self.mean_prefill = mean_prefill_prior  # running mean of the tokens a routed request computes
        self._backlog: dict[str, tuple[float, float]] = {}

    def terms(self, worker_id: str, *, num_tokens: int, block_size: int, held: Held, queued_inflight: int,
              waiting_reported: int, active: int, report_age: float = 0.0) -> TtftTerms:
        held_tokens = min(held.blocks * block_size, num_tokens - 1)
        uncached = max(num_tokens - held_tokens, 1)
        # Blocks held only in a lower tier: their credit is below 1; the rest of a block is onboarding.
        onboard = max(held.blocks - held.credit, 0.0) * block_size
        rate = self.rate.rate(worker_id)
        # Requests whose first token has not come back yet, but no more than the worker can still be
        # computing at its rate: a first token the frontend has not read yet (it is busy) is not queued
        # work on the worker.
        queued = min(float(queued_inflight), self._drained(worker_id, rate))
        # The report's waiting requests, drained likewise since the worker took the report.
        queued = max(queued, waiting_reported * self.mean_prefill - rate * max(report_age, 0.0))
        return TtftTerms(queued, uncached, onboard, active, rate)

    def routed(self, worker_id: str, prefill_tokens: int, own: bool = True) -> None:
        """`prefill_tokens` of work were routed to the worker (`own`: by this router; peers' routes add to
        the backlog but not to the running mean, which they would count twice)."""
        self._backlog[worker_id] = (self._drained(worker_id, self.rate.rate(worker_id)) + prefill_tokens,
                                    self.clock())
        if own:
            self.mean_prefill += MEAN_PREFILL_ALPHA * (prefill_tokens - self.mean_prefill)

    def _drained(self, worker_id: str, rate: float) -> float:
        tokens, at = self._backlog.get(worker_id, (0.0, 0.0))
        return max(tokens - rate * (self.clock() - at), 0.0)

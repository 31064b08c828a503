"""The kv router's expected time to first token of a request on a worker (issue 27). Every term and its
source is listed in frontend/README.md "Routing"; in short, in prompt tokens converted to seconds by the
worker's prefill rate:

    ttft = (queued + uncached + onboard + RUNNING_TOKEN_EQUIV * active + excess * mean_prefill) / rate

- queued: prefill work ahead of the request on that worker: its last load report's waiting requests x
  `mean_prefill` (drained at `rate` since the report was taken), plus the requests routed there since
  that report (by this router and its peers) that have produced no first token, each with the tokens the
  router expected it to compute (all of them when the worker has no report).
- uncached: the prompt's tokens the worker does not hold in G1 (nor speculatively) nor in a weighted lower
  tier; at least 1 (an engine always computes the last token).
- onboard: blocks held only in a lower tier cost (1 - tier weight) of their prefill time to bring up.
- active: its running + waiting requests (reported, or in flight from the routers, whichever is larger);
  a decode beside the prefill lengthens each step by about one token's prefill
  (`RUNNING_TOKEN_EQUIV`, from the mocker's default timing: 20 us per decoding sequence and per prefill
  token, itself modeled on an 8B model on one H100).
- excess (the balance term): `balance` x the worker's in-flight requests beyond 1.5 x the candidates'
  mean + 2 (router.py BALANCE_ZONE, BALANCE_SLACK); each costs `mean_prefill`, the running mean of the
  tokens a request computes on the worker best placed for it. What it stands for: a worker's batch is finite
  (requests beyond it wait for a slot, and every decode step grows with it), which the first-token time
  of an unloaded engine does not show; in the unit of the workload (a request's worth of prefill), so
  a short conversation moves at a small imbalance and a long one only at a large one, and new
  conversations (little cached anywhere) spread over the workers.
- rate: the prefill rate the workers measure and report in their load reports (`LoadMetrics.prefill_rate`,
  workers/prefill_meter.py), one for all candidates (their median: kv_router.py `fleet_rate`); until one
  has, or from an engine that does not (vLLM), `PrefillRate`, learned here from first-token times
  (prefill_rate.py).
"""

from __future__ import annotations

import math

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
    imbalance: float  # excess x mean_prefill
    rate: float  # tokens/s

    @property
    def seconds(self) -> float:
        return (self.queued + self.uncached + self.onboard + RUNNING_TOKEN_EQUIV * self.active
                + self.imbalance) / self.rate


class TtftModel:
    def __init__(self, rate: PrefillRate | None = None, mean_prefill_prior: float = 256.0):
        self.rate = rate if rate is not None else PrefillRate()
        # Running mean of the tokens a request computes on the worker best placed for it (the fewest
        # uncached), so the routing decisions themselves (a moved conversation computes more) cannot
        # feed back into it.
        self.mean_prefill = mean_prefill_prior

    def terms(self, worker_id: str, *, num_tokens: int, block_size: int, held: Held, queued_inflight: int,
              waiting_reported: int, active: int, report_age: float = math.inf, excess: float = 0.0,
              reported_rate: float = 0.0) -> TtftTerms:
        """`queued_inflight`: the expected prefill tokens of requests routed to the worker since its last
        load report (taken `report_age` seconds ago) that have produced no first token; the report's
        `waiting_reported` stand for those routed before it. `reported_rate`: the prefill rate the worker
        measured and reported (tokens/s), used when > 0 instead of the one learned here."""
        held_tokens = min(held.blocks * block_size, num_tokens - 1)
        uncached = max(num_tokens - held_tokens, 1)
        # Blocks held only in a lower tier: their credit is below 1; the rest of a block is onboarding.
        onboard = max(held.blocks - held.credit, 0.0) * block_size
        rate = reported_rate if reported_rate > 0 else self.rate.rate(worker_id)
        reported = 0.0
        if math.isfinite(report_age):  # its waiting requests, drained at the rate since the report
            reported = max(waiting_reported * self.mean_prefill - rate * max(report_age, 0.0), 0.0)
        return TtftTerms(queued_inflight + reported, uncached, onboard, active, excess * self.mean_prefill, rate)

    def observe_request(self, best_prefill: int) -> None:
        self.mean_prefill += MEAN_PREFILL_ALPHA * (best_prefill - self.mean_prefill)

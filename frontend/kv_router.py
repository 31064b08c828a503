"""The kv router (mode `kv`). Its cost of a worker (lower is better), `cost="ttft"` (the default, issue 27): the expected
time to first token of this request there, in seconds (ttft_cost.py; every term and its source in
frontend/README.md "Routing"):
    ttft = (queued_prefill_tokens + uncached_tokens + onboard_tokens
            + RUNNING_TOKEN_EQUIV * active_requests + imbalance) / prefill_rate
(imbalance: `balance` x the in-flight requests beyond 1.5 x the mean + 2, each a mean request's prefill)
`cost="overlap"` keeps the formula before it, for comparison:
    cost = overlap_weight * uncached_prefill_blocks + active_decode_blocks
In both, what a worker holds is the `KvIndex` plus speculative entries (speculative_index.py): the
blocks of every prompt routed to it within the last `speculative_ttl` seconds that its KV events have not
confirmed yet. Ties (within half a block's prefill time for ttft) go to the worker holding the longest
prefix (a conversation stays where its history is), then to fewer active requests, then uniformly at
random (the RNG is passed in: no global random state). With `temperature > 0` the worker is sampled
instead, with probability proportional to exp(-z / temperature), z = the cost min-max normalized to
[0, 1] over the candidates. The overlap formula's `overlap_weight` trades cache reuse against balance; at
~2 requests per worker one request's worth of load imbalance outweighs a conversation's history, so
conversations moved (issue 27 measured 31-36% of follow-up turns moving at 4 workers): the ttft cost
counts the load that delays a first token (queued prefill work) and imbalance beyond a zone of noise,
not every decode that runs beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kvrelay.frontend.kv_index import KvIndex
from kvrelay.frontend.prefill_rate import PrefillRate
from kvrelay.frontend.router import BaseRouter, Decision, RouteRequest, WorkerState
from kvrelay.frontend.speculative_index import Held, SpeculativeIndex, held_prefix
from kvrelay.frontend.ttft_cost import TtftModel


class KvRouter(BaseRouter):
    name = "kv"

    def __init__(self, index: KvIndex, *, cost: str = "ttft", overlap_weight: float = 1.0, temperature: float = 0.0,
                 tier_weights: Mapping[str, float] | None = None, speculative_ttl: float = 10.0,
                 prefill_rate: PrefillRate | None = None, balance: float = 2.0, peer_weight: float = 0.0,
                 **kw: Any) -> None:
        """`cost`: "ttft" (expected time to first token) or "overlap" (the weighted formula);
        `tier_weights`: credit for a prefix block found in each tier (default G1 only, 1.0);
        `speculative_ttl`: seconds a routed prompt's blocks count as held before KV events confirm them
        (0: off); `prefill_rate`: the learned prefill speeds (a fresh `PrefillRate` by default);
        `balance` (ttft cost): each active request a worker has above the candidates' mean costs `balance`
        x the mean prefill of a routed request (0: off; see ttft_cost.py); `peer_weight` (ttft cost): the
        credit of a block another worker holds in G1, which the chosen one pulls (the cluster KV pool;
        0: off), like a lower tier's: the rest of its prefill time is the pull's."""
        super().__init__(**kw)
        clock = self.clock
        if overlap_weight < 0 or temperature < 0 or balance < 0 or not 0 <= peer_weight < 1:
            raise ValueError("overlap_weight, temperature and balance must be >= 0, peer_weight in [0, 1)")
        if cost not in COSTS:
            raise ValueError(f"unknown router cost {cost!r}; choose from {', '.join(COSTS)}")
        self.index = index
        self.cost = cost
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.balance = balance
        self.peer_weight = peer_weight
        self.tier_weights = dict(tier_weights) if tier_weights else {"G1": 1.0}
        self.speculative = SpeculativeIndex(speculative_ttl, clock) if speculative_ttl > 0 else None
        self.ttft = TtftModel(prefill_rate)
        # request id -> (worker, prefill tokens queued ahead of it there, prompt tokens): for learning the
        # worker's prefill rate at its first token. Invariant: a subset of `inflight`'s own requests.
        self._sent: dict[str, tuple[str, int, int]] = {}

    def _routed(self, worker_id: str, hashes: list[int]) -> None:
        if self.speculative is not None:
            self.speculative.add(worker_id, hashes)

    def _choose(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        held = held_prefix(request.block_hashes, self.index, self.speculative, self.tier_weights)
        if self.cost == "overlap":
            n = request.num_blocks
            costs = [self.overlap_weight * max(n - held.get(w.worker_id, _NONE).credit, 0) + self.load(w)[1]
                     for w in workers]
            tolerance = 1e-9
            prefill = [max(request.num_prompt_tokens - held.get(w.worker_id, _NONE).blocks * request.block_size, 1)
                       for w in workers]
        else:
            # In-flight requests (this router's and its peers'), not the load reports: exact at decision
            # time, where a report is a snapshot of some milliseconds ago (run-to-run noise).
            actives = [self.inflight.requests(w.worker_id) for w in workers]
            mean_active = sum(actives) / len(actives)
            now = self.clock()
            rate = fleet_rate(workers)
            peer = self._best_holder(held, request.block_hashes)
            terms = [self.ttft.terms(w.worker_id, num_tokens=request.num_prompt_tokens,
                                     block_size=request.block_size,
                                     held=self._with_peer(held.get(w.worker_id, _NONE), w.worker_id, peer),
                                     queued_inflight=self.inflight.queued_prefill(w.worker_id,
                                                                                  since=now - w.report_age),
                                     waiting_reported=w.waiting_requests, report_age=w.report_age,
                                     reported_rate=rate,
                                     active=active,
                                     excess=self.balance * max(active - (BALANCE_ZONE * mean_active + BALANCE_SLACK), 0.0))
                     for w, active in zip(workers, actives, strict=True)]
            costs = [t.seconds for t in terms]
            # Half a block's prefill on the fastest worker: closer than that is a tie.
            tolerance = 0.5 * request.block_size / max(t.rate for t in terms)
            prefill = [t.uncached for t in terms]
            self.ttft.observe_request(min(prefill))
        if self.temperature > 0:
            i = self._sample(costs)
        else:
            best = min(costs)
            i = self._sticky_tie_break([i for i, c in enumerate(costs) if c <= best + tolerance], workers, held)
        chosen = workers[i]
        peer_id, peer_blocks = "", 0
        if self.cost != "overlap" and self.peer_weight > 0:
            holder = self._best_holder(held, request.block_hashes)
            # Against what the chosen worker has computed (confirmed), not what was routed to it: a run it
            # holds only speculatively may be another request's pull in progress there, and without a
            # plan of its own this request computes the run beside that pull (a burst at 16 workers: each
            # worker's second prompt of the burst computed the shared prefix). Its worker asks only for
            # blocks its G1 lacks when it gets there, so a plan it does not need costs nothing.
            if holder is not None and holder[0] != chosen.worker_id \
                    and holder[1] > held.get(chosen.worker_id, _NONE).confirmed:
                peer_id, peer_blocks = holder
        return Decision(worker_id=chosen.worker_id, overlap_blocks=held.get(chosen.worker_id, _NONE).g1,
                        cost=costs[i], prefill_tokens=prefill[i], peer_id=peer_id, peer_blocks=peer_blocks)

    def _best_holder(self, held: Mapping[str, Held], hashes: Sequence[int]) -> tuple[str, int] | None:
        """The worker holding the longest leading run in G1 (or speculatively), any worker the index
        knows (a busy or draining one included: it can still lend); None with peers off or no holder.
        Of equal runs, the one whose events confirmed more of it, then the one routed it first: at a
        burst of prompts sharing a new prefix every worker routed one holds it speculatively, and most
        of them are pulling it from the first (naming one of those made a chain of waits, or a lease
        of nothing and a recompute: issue 27, 16 workers)."""
        if self.peer_weight <= 0 or not held:
            return None

        def key(item: tuple[str, Held]) -> tuple[int, int, float, str]:
            worker, h = item
            routed = self.speculative.holders(hashes[h.g1 - 1]).get(worker, 0.0) \
                if self.speculative is not None and h.g1 > h.confirmed else 0.0
            return h.g1, h.confirmed, -routed, worker  # routed: the entry's expiry (earlier routed: smaller)

        worker, h = max(held.items(), key=key)
        return (worker, h.g1) if h.g1 > 0 else None

    def _with_peer(self, own: Held, worker_id: str, peer: tuple[str, int] | None) -> Held:
        """What `worker_id` would hold once it pulled the peer's blocks past its own: each pulled block
        credited `peer_weight` (the onboard term then charges the rest of its prefill as the pull)."""
        if peer is None or peer[0] == worker_id or peer[1] <= own.blocks:
            return own
        extra = peer[1] - own.blocks
        return Held(own.blocks + extra, own.g1, own.credit + extra * self.peer_weight, own.confirmed)

    def select(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        decision = super().select(request, workers)
        queued = self.inflight.queued_prefill(decision.worker_id) - decision.prefill_tokens
        self._sent[request.request_id] = (decision.worker_id, queued, request.num_prompt_tokens)
        return decision

    def on_first_token(self, request_id: str, seconds: float | None = None, cached_tokens: int | None = None) -> None:
        sent = self._sent.pop(request_id, None)
        if sent is not None and seconds is not None:
            worker_id, queued, prompt = sent
            computed = prompt - cached_tokens if cached_tokens is not None else self.inflight.prefill_pending(request_id)
            self.ttft.rate.observe(worker_id, queued + max(computed, 1), seconds)
        super().on_first_token(request_id, seconds, cached_tokens)

    def on_finish(self, request_id: str) -> None:
        self._sent.pop(request_id, None)
        super().on_finish(request_id)

    def _sticky_tie_break(self, tied: list[int], workers: Sequence[WorkerState], held: Mapping[str, Held]) -> int:
        """Of equally good workers: the one holding the longest prefix (a conversation stays sticky), then
        the fewest active requests, then uniformly at random."""
        if len(tied) == 1:
            return tied[0]
        keys = {i: (-held.get(workers[i].worker_id, _NONE).g1, self.load(workers[i])[0]) for i in tied}
        best = min(keys.values())
        return self.rng.choice([i for i in tied if keys[i] == best])

    def _sample(self, costs: Sequence[float]) -> int:
        lo, hi = min(costs), max(costs)
        span = hi - lo
        weights = [math.exp(-((c - lo) / span if span > 0 else 0.0) / self.temperature) for c in costs]
        return self.rng.choices(range(len(costs)), weights=weights)[0]


COSTS = ("ttft", "overlap")


# The balance term counts a worker's active requests beyond BALANCE_ZONE x the mean + BALANCE_SLACK: within
# it, imbalance is the noise of conversations coming and going (issue 27: counting every request above the
# mean moved conversations off their history at 16 workers, 2-5 requests each), and the slack keeps one
# request more than the others at low load from counting.
BALANCE_ZONE = 1.5
BALANCE_SLACK = 2.0
_NONE = Held(0, 0, 0.0)




def fleet_rate(workers: Sequence[WorkerState]) -> float:
    """One prefill rate for every candidate: the median of what they report (0: none reports). Not each
    worker's own: identical workers report different rates for their different mixes of prompts
    (attention grows with context), and with peer pulls making history cheap to move, the router then
    piled conversations onto whichever worker had been fed short prompts (max/mean prompt tokens per
    worker 4.2-5.7 at 16 mocker workers, perf/RESULTS.md). A fleet of unequal GPUs is not yet modeled."""
    reported = sorted(w.prefill_rate for w in workers if w.prefill_rate > 0)
    return reported[len(reported) // 2] if reported else 0.0

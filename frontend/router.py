"""Routers: pick the worker for a request. Modes: `round-robin`, `random`, `least-loaded`, `kv`.

Every router keeps exact accounting of its own in-flight requests (what it routed and was not yet told
finished, via `on_finish`), so a burst routed faster than workers report load still spreads: a
request counts against its worker from the moment it is routed. Its blocks are the prompt's, a block
shared by several in-flight prompts (a system prompt) counted once, as the worker's paged prefix
cache holds it once. A worker's load is the larger of what it reports (`WorkerState`, from fresh
`LoadMetrics`, which include this router's requests once the worker has them) and this router's own
in-flight count, so nothing is counted twice. With several frontends, the in-flight accounting holds
the other frontends' requests too (peer_load.py feeds them in; `sync` tells it what this router did).

The kv router's cost of a worker (lower is better):
    cost = overlap_weight * uncached_prefill_blocks + active_decode_blocks
uncached_prefill_blocks = the prompt's blocks minus the prefix the `KvIndex` says the worker holds.
Ties go to the worker with fewer active requests, then uniformly at random (the RNG is passed in:
no global random state). With `temperature > 0` the worker is sampled instead, with probability
proportional to exp(-z / temperature), z = the cost min-max normalized to [0, 1] over the candidates.
`overlap_weight` trades cache reuse against balance: at ~2 requests per worker, one request's worth
of load imbalance outweighs a short conversation's history at 1.0, so conversations move (see
tests/frontend/test_routing_quality.py for measurements). When nothing is in flight the load term is
zero and the workers holding a prompt's prefix get it: traffic spreads once requests overlap.

Every decision's duration is observed in the histogram `kvrelay_router_decision_seconds{router}`,
registered on the `CollectorRegistry` passed in (one router per registry).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec
from prometheus_client import CollectorRegistry, Histogram

from kvrelay.frontend.kv_index import KvIndex
from kvrelay.runtime.metrics import new_registry

_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 1e-1)


class RouteRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    block_hashes: list[int]  # kvbm.hashing.block_hashes of the prompt (full blocks only)
    num_prompt_tokens: int
    block_size: int = 16  # the one the hashes were computed with

    @property
    def num_blocks(self) -> int:
        """Blocks the prompt occupies on a worker, the last partial one included."""
        return max(len(self.block_hashes), -(-self.num_prompt_tokens // self.block_size))


class WorkerState(msgspec.Struct, frozen=True, kw_only=True):
    """A routable worker and what it last reported (zeros when unknown or stale)."""

    worker_id: str
    active_requests: int = 0  # LoadMetrics running + waiting
    active_decode_blocks: int = 0  # KV blocks held by its running requests
    kv_usage: float = 0.0  # 0..1


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    overlap_blocks: int = 0  # G1 prefix blocks the index says the worker holds (kv router only)
    cost: float = 0.0  # the router's score of the chosen worker (lower is better)


class NoWorkersError(Exception):
    """No worker to route to."""


class Router(Protocol):
    name: str

    def select(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision: ...

    def on_finish(self, request_id: str) -> None: ...


class InFlight:
    """This router's requests per worker, and the KV blocks they occupy there. A block shared by several
    of them (a common system prompt) is one block in a paged prefix cache, so it counts once.

    Invariants: `_reqs[w]` is the number of entries of `_by_id` on `w`; `_hashes[w]` counts, per block
    hash, the entries on `w` whose prompt has it; `_partial[w]` is their number of partial last blocks;
    a worker with nothing in flight has no entry in any of them."""

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[str, list[int], int]] = {}  # id -> (worker, hashes, partial blocks)
        self._reqs: dict[str, int] = {}
        self._hashes: dict[str, Counter[int]] = {}
        self._partial: dict[str, int] = {}

    def add(self, request_id: str, worker_id: str, request: RouteRequest) -> None:
        self.add_entry(request_id, worker_id, request.block_hashes, request.num_blocks - len(request.block_hashes))

    def add_entry(self, request_id: str, worker_id: str, hashes: list[int], partial: int) -> None:
        self.finish(request_id)
        self._by_id[request_id] = (worker_id, hashes, partial)
        request_hashes = hashes
        self._reqs[worker_id] = self._reqs.get(worker_id, 0) + 1
        self._hashes.setdefault(worker_id, Counter()).update(request_hashes)
        self._partial[worker_id] = self._partial.get(worker_id, 0) + partial

    def finish(self, request_id: str) -> bool:
        """Release a request; False (and no change) if it is unknown or already released."""
        entry = self._by_id.pop(request_id, None)
        if entry is None:
            return False
        w, hashes, partial = entry
        self._reqs[w] -= 1
        self._partial[w] -= partial
        held = self._hashes[w]
        held.subtract(hashes)
        for h in hashes:
            if held.get(h) == 0:
                del held[h]
        if self._reqs[w] == 0:
            del self._reqs[w], self._hashes[w], self._partial[w]
        return True

    def requests(self, worker_id: str) -> int:
        return self._reqs.get(worker_id, 0)

    def blocks(self, worker_id: str) -> int:
        """Distinct blocks of this router's in-flight prompts on the worker."""
        return len(self._hashes.get(worker_id, ())) + self._partial.get(worker_id, 0)

    def __len__(self) -> int:
        return len(self._by_id)

    def entries(self) -> list[tuple[str, tuple[str, list[int], int]]]:
        """(request id, (worker, block hashes, partial blocks)) of every request in flight."""
        return list(self._by_id.items())


def decision_histogram(registry: CollectorRegistry | None) -> Histogram:
    return Histogram("kvrelay_router_decision_seconds", "Time to pick a worker for a request", ["router"],
                     registry=registry if registry is not None else new_registry(), buckets=_BUCKETS)


class BaseRouter:
    name = "base"

    def __init__(self, *, rng: random.Random | None = None, registry: CollectorRegistry | None = None,
                 histogram: Histogram | None = None, label: str = ""):
        """`histogram`: a `decision_histogram` to share with other routers on one registry (a
        disaggregated frontend routes prefill and decode separately); `label` names this router in it."""
        self.rng = rng if rng is not None else random.Random()
        self.inflight = InFlight()
        hist = histogram if histogram is not None else decision_histogram(registry)
        self.label = label or self.name
        self.decision_seconds = hist.labels(router=self.label)
        # sync(request_id, worker_id | None, hashes, partial): told each request routed (worker) and
        # finished (None), for the other frontends (peer_load.py).
        self.sync: Any = None

    def select(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        if not workers:
            raise NoWorkersError("no worker available")
        start = time.perf_counter()
        # A request routed again (migration) first gives back its old slot.
        self.inflight.finish(request.request_id)
        decision = self._choose(request, workers)
        self.inflight.add(request.request_id, decision.worker_id, request)
        self.decision_seconds.observe(time.perf_counter() - start)
        if self.sync is not None:
            self.sync(request.request_id, decision.worker_id, request.block_hashes,
                      request.num_blocks - len(request.block_hashes))
        return decision

    def on_finish(self, request_id: str) -> None:
        """The request ended (any way). Idempotent."""
        if self.inflight.finish(request_id) and self.sync is not None:
            self.sync(request_id, None)

    def load(self, w: WorkerState) -> tuple[int, int]:
        """(active requests, active decode blocks): reported or in flight (from every frontend),
        whichever is larger."""
        return (max(w.active_requests, self.inflight.requests(w.worker_id)),
                max(w.active_decode_blocks, self.inflight.blocks(w.worker_id)))

    def _choose(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        raise NotImplementedError

    def _tie_break(self, workers: Sequence[WorkerState]) -> WorkerState:
        """Fewest active requests, then uniformly at random."""
        least = min(self.load(w)[0] for w in workers)
        return self.rng.choice([w for w in workers if self.load(w)[0] == least])


class RoundRobinRouter(BaseRouter):
    name = "round-robin"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._next = 0

    def _choose(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        ordered = sorted(workers, key=lambda w: w.worker_id)  # stable order whatever the caller's
        w = ordered[self._next % len(ordered)]
        self._next += 1
        return Decision(worker_id=w.worker_id)


class RandomRouter(BaseRouter):
    name = "random"

    def _choose(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        return Decision(worker_id=self.rng.choice(list(workers)).worker_id)


class LeastLoadedRouter(BaseRouter):
    """Fewest active requests; then fewest active blocks; then at random."""

    name = "least-loaded"

    def _choose(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        best = min(self.load(w) for w in workers)
        w = self.rng.choice([w for w in workers if self.load(w) == best])
        return Decision(worker_id=w.worker_id, cost=float(best[0]))


class KvRouter(BaseRouter):
    name = "kv"

    def __init__(self, index: KvIndex, *, overlap_weight: float = 1.0, temperature: float = 0.0,
                 tier_weights: Mapping[str, float] | None = None, **kw: Any) -> None:
        """`tier_weights`: credit for a prefix block found in each tier (default G1 only, 1.0)."""
        super().__init__(**kw)
        if overlap_weight < 0 or temperature < 0:
            raise ValueError("overlap_weight and temperature must be >= 0")
        self.index = index
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.tier_weights = dict(tier_weights) if tier_weights else {"G1": 1.0}

    def _choose(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        overlaps = self.index.overlap(request.block_hashes)
        cached: Mapping[str, float] = overlaps
        if self.tier_weights != {"G1": 1.0}:
            cached = self.index.weighted_overlap(request.block_hashes, self.tier_weights)
        n = request.num_blocks
        costs = [self.overlap_weight * max(n - cached.get(w.worker_id, 0), 0) + self.load(w)[1]
                 for w in workers]
        if self.temperature > 0:
            i = self._sample(costs)
            chosen, cost = workers[i], costs[i]
        else:
            cost = min(costs)
            chosen = self._tie_break([w for w, c in zip(workers, costs, strict=True) if c <= cost + 1e-9])
        return Decision(worker_id=chosen.worker_id, overlap_blocks=overlaps.get(chosen.worker_id, 0),
                        cost=cost)

    def _sample(self, costs: Sequence[float]) -> int:
        lo, hi = min(costs), max(costs)
        span = hi - lo
        weights = [math.exp(-((c - lo) / span if span > 0 else 0.0) / self.temperature) for c in costs]
        return self.rng.choices(range(len(costs)), weights=weights)[0]


def make_router(mode: str, *, index: KvIndex | None = None, rng: random.Random | None = None,
                registry: CollectorRegistry | None = None, histogram: Histogram | None = None, label: str = "",
                **kv_options: Any) -> BaseRouter:
    """A router by mode name; `kv` needs the index (and takes KvRouter's options)."""
    common: dict[str, Any] = {"rng": rng, "registry": registry, "histogram": histogram, "label": label}
    if mode == "kv":
        if index is None:
            raise ValueError("the kv router needs a KvIndex")
        return KvRouter(index, **common, **kv_options)
    routers: dict[str, type[BaseRouter]] = {
        "round-robin": RoundRobinRouter, "random": RandomRouter, "least-loaded": LeastLoadedRouter}
    if mode not in routers:
        raise ValueError(f"unknown router mode {mode!r}; choose from round-robin, random, least-loaded, kv")
    return routers[mode](**common)

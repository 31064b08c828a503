"""Routers: pick the worker for a request. Modes: `round-robin`, `random`, `least-loaded`, `kv`.

Every router keeps exact accounting of its own in-flight requests (what it routed and was not yet told
finished, via `on_finish`), so a burst routed faster than workers report load still spreads: a
request counts against its worker from the moment it is routed. Its blocks are the prompt's, a block
shared by several in-flight prompts (a system prompt) counted once, as the worker's paged prefix
cache holds it once. A worker's load is the larger of what it reports (`WorkerState`, from fresh
`LoadMetrics`, which include this router's requests once the worker has them) and this router's own
in-flight count, so nothing is counted twice. With several frontends, the in-flight accounting holds
the other frontends' requests too (peer_load.py feeds them in; `sync` tells it what this router did).

The kv router (`kv_router.py`) scores workers by the expected time to first token there.

Every decision's duration is observed in the histogram `kvrelay_router_decision_seconds{router}`,
registered on the `CollectorRegistry` passed in (one router per registry).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
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
    waiting_requests: int = 0  # LoadMetrics waiting: admitted, not yet scheduled (part of active_requests)
    report_age: float = math.inf  # seconds since the worker took the load report these come from (inf: none)
    prefill_rate: float = 0.0  # LoadMetrics prefill_rate: its measured prompt tokens/s (0: not reported)


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    overlap_blocks: int = 0  # G1 prefix blocks the index says the worker holds (kv router only)
    cost: float = 0.0  # the router's score of the chosen worker (lower is better)
    prefill_tokens: int = 0  # prompt tokens the router expects the worker to compute (kv router only)
    # The cluster KV pool: another worker holding more of the prompt in G1, for the chosen one to pull
    # from (`EngineRequest.kv_peer`), and how many leading blocks it holds ("" / 0: none).
    peer_id: str = ""
    peer_blocks: int = 0


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
    a worker with nothing in flight has no entry in any of them. Prefill accounting (issue 27):
    `_prefill[id]` is (prompt tokens an entry still has to compute before its first token, when it was
    routed) (entries past their first token have none), `_queued[w]` the sum of those tokens on `w` and
    `_pending[w]` the ids of those entries (both absent when none)."""

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[str, list[int], int]] = {}  # id -> (worker, hashes, partial blocks)
        self._reqs: dict[str, int] = {}
        self._hashes: dict[str, Counter[int]] = {}
        self._partial: dict[str, int] = {}
        self._prefill: dict[str, tuple[int, float]] = {}
        self._queued: dict[str, int] = {}
        self._pending: dict[str, set[str]] = {}

    def add(self, request_id: str, worker_id: str, request: RouteRequest, prefill_tokens: int = 0,
            at: float = 0.0) -> None:
        self.add_entry(request_id, worker_id, request.block_hashes, request.num_blocks - len(request.block_hashes),
                       prefill_tokens, at)

    def add_entry(self, request_id: str, worker_id: str, hashes: list[int], partial: int,
                  prefill_tokens: int = 0, at: float = 0.0) -> None:
        """`at`: when it was routed (the router's clock), for `queued_prefill(since=...)`."""
        self.finish(request_id)
        self._by_id[request_id] = (worker_id, hashes, partial)
        request_hashes = hashes
        self._reqs[worker_id] = self._reqs.get(worker_id, 0) + 1
        self._hashes.setdefault(worker_id, Counter()).update(request_hashes)
        self._partial[worker_id] = self._partial.get(worker_id, 0) + partial
        if prefill_tokens > 0:
            self._prefill[request_id] = (prefill_tokens, at)
            self._queued[worker_id] = self._queued.get(worker_id, 0) + prefill_tokens
            self._pending.setdefault(worker_id, set()).add(request_id)

    def first_token(self, request_id: str) -> int:
        """The request's prefill is done: its tokens leave the worker's prefill queue. Returns how many
        (0 if unknown or already done)."""
        tokens, _ = self._prefill.pop(request_id, (0, 0.0))
        if tokens:
            w = self._by_id[request_id][0]
            self._queued[w] -= tokens
            self._pending[w].discard(request_id)
            if not self._pending[w]:
                del self._queued[w], self._pending[w]
        return tokens

    def queued_prefill(self, worker_id: str, since: float = -math.inf) -> int:
        """Prompt tokens of in-flight requests on the worker that have not produced a first token (and
        were routed after `since`)."""
        if since == -math.inf:
            return self._queued.get(worker_id, 0)
        return sum(t for t, at in (self._prefill[i] for i in self._pending.get(worker_id, ())) if at > since)

    def entries_ids(self) -> Collection[str]:
        return self._by_id.keys()

    def prefill_pending(self, request_id: str) -> int:
        return self._prefill.get(request_id, (0, 0.0))[0]

    def finish(self, request_id: str) -> bool:
        """Release a request; False (and no change) if it is unknown or already released."""
        if request_id not in self._by_id:
            return False
        self.first_token(request_id)
        w, hashes, partial = self._by_id.pop(request_id)
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


ROUTED, FIRST_TOKEN, FINISHED = 0, 2, 1  # what `BaseRouter.sync` is told (peer_load.py's Op kinds)


class BaseRouter:
    name = "base"

    def __init__(self, *, rng: random.Random | None = None, registry: CollectorRegistry | None = None,
                 histogram: Histogram | None = None, label: str = "", clock: Callable[[], float] = time.monotonic):
        """`histogram`: a `decision_histogram` to share with other routers on one registry (a
        disaggregated frontend routes prefill and decode separately); `label` names this router in it."""
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.inflight = InFlight()
        hist = histogram if histogram is not None else decision_histogram(registry)
        self.label = label or self.name
        self.decision_seconds = hist.labels(router=self.label)
        # sync(kind, request_id, worker_id="", hashes=(), partial=0, prefill=0), kind ROUTED, FIRST_TOKEN
        # or FINISHED: told what this router's requests do, for the other frontends (peer_load.py).
        self.sync: Any = None

    def select(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        if not workers:
            raise NoWorkersError("no worker available")
        start = time.perf_counter()
        # A request routed again (migration) first gives back its old slot.
        self.inflight.finish(request.request_id)
        decision = self._choose(request, workers)
        self.inflight.add(request.request_id, decision.worker_id, request, decision.prefill_tokens, self.clock())
        self._routed(decision.worker_id, request.block_hashes)
        self.decision_seconds.observe(time.perf_counter() - start)
        if self.sync is not None:
            self.sync(ROUTED, request.request_id, decision.worker_id, request.block_hashes,
                      request.num_blocks - len(request.block_hashes), decision.prefill_tokens)
        return decision

    def on_first_token(self, request_id: str, seconds: float | None = None, cached_tokens: int | None = None) -> None:
        """The request's first token arrived, `seconds` after it was sent, and the worker reported
        `cached_tokens` of its prompt as cached (both optional: a router that learns from them uses
        them). Its prefill no longer queues before others. Idempotent."""
        if self.inflight.first_token(request_id) and self.sync is not None:
            self.sync(FIRST_TOKEN, request_id)

    def on_finish(self, request_id: str) -> None:
        """The request ended (any way). Idempotent."""
        if self.inflight.finish(request_id) and self.sync is not None:
            self.sync(FINISHED, request_id)

    def add_peer(self, request_id: str, worker_id: str, hashes: list[int], partial: int, prefill: int = 0) -> None:
        """Another frontend routed a request (peer_load.py): it counts here as if this router had."""
        self.inflight.add_entry(request_id, worker_id, hashes, partial, prefill, self.clock())
        self._routed(worker_id, hashes)

    def _routed(self, worker_id: str, hashes: list[int]) -> None:
        """A prompt with `hashes` was routed to the worker (by this router or a peer)."""

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


def make_router(mode: str, *, index: KvIndex | None = None, rng: random.Random | None = None,
                registry: CollectorRegistry | None = None, histogram: Histogram | None = None, label: str = "",
                **kv_options: Any) -> BaseRouter:
    """A router by mode name; `kv` needs the index (and takes KvRouter's options)."""
    common: dict[str, Any] = {"rng": rng, "registry": registry, "histogram": histogram, "label": label}
    if mode == "kv":
        if index is None:
            raise ValueError("the kv router needs a KvIndex")
        from kvrelay.frontend.kv_router import KvRouter  # it builds on BaseRouter, here

        return KvRouter(index, **common, **kv_options)
    routers: dict[str, type[BaseRouter]] = {
        "round-robin": RoundRobinRouter, "random": RandomRouter, "least-loaded": LeastLoadedRouter}
    if mode not in routers:
        raise ValueError(f"unknown router mode {mode!r}; choose from round-robin, random, least-loaded, kv")
    return routers[mode](**common)

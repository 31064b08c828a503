"""Another worker's G1 as a KV source (core half; the cluster KV pool): when the router says a peer holds
more of a request's prompt than this worker does (`EngineRequest.kv_peer`), the sequence waits while
the loop half asks the peer to pin that run under a lease (`PeerAsk`), then pulls the blocks past its
own G1 hit over the transfer engine (a `PullJob`, as the prefill handoff's, with the same `KvPuller`) instead of
computing them. peer_loop.py does the I/O. docs/ARCHITECTURE.md "Cluster KV pool".

Invariants: blocks are asked for by hash (chained from this engine's fingerprint, the request's cache
salt and LoRA), so a peer can only ever lend blocks of this very prefix (another salt's hashes differ);
the peer checks the fingerprint too. Every lease granted is given back exactly once: by its pull's
notification, or by a `PullJob` with no blocks (`report=False`) when nothing is pulled. A failed ask or
pull costs a recompute of the missing blocks, never the request.

One pull per run per worker: a sequence whose first block past G1's hit is already being asked for or
pulled by another sequence here (`_in_flight`) does not ask; it follows that one (waits for KV) and is
woken (`PeerWake`) when the other's pull lands or ends, then matches again against a G1 that now holds
what was pulled. Without this, a burst of conversations sharing a prefix each leased and pulled the
same blocks, spent the pull budget and computed the prefix beside the pulls. Every follower is woken
exactly once per leader, whichever way the leader ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from kvrelay.workers.api.messages import EngineRequest, KvHandle, KvPeer
from kvrelay.workers.core.commands import Command, KvAnswered
from kvrelay.workers.core.kv_sources.handoff import PullJob
from kvrelay.workers.core.kv_sources.source import NO_MATCH, Match
from kvrelay.workers.core.sequence import Sequence

NAME = "peer"
# The longest a lender holds an ask open while a prefill in progress computes the asked run
# (lease_waits.py); the asker waits twice that for the answer, so a lease that waited still arrives.
LEND_WAIT_S = 1.0


@dataclass(frozen=True)
class PeerAsk:
    """Ask `peer` to lease the leading run of `hashes` it holds; answered with `KvAnswered` (a
    `KvHandle` over the leased blocks, or None)."""

    source: ClassVar[str] = NAME
    request_id: str
    peer: KvPeer
    fingerprint: str
    hashes: list[int]

    def failed(self) -> Command:
        return KvAnswered(NAME, self.request_id, None)


@dataclass(frozen=True)
class PeerWake:
    """Answer `request_id` at once (it followed another sequence's pull, which ended): it matches again."""

    source: ClassVar[str] = NAME
    request_id: str


@dataclass
class PeerCounters:
    asked: int = 0  # requests that asked a peer for a lease
    pulled_requests: int = 0  # of those, requests that pulled blocks
    pulled_blocks: int = 0
    failures: int = 0  # a pull that did not deliver (the blocks were recomputed)
    fallbacks: int = 0  # an ask that got nothing usable (evicted meanwhile, peer gone): recomputed
    followed: int = 0  # times a sequence waited for another's pull of the same run instead of asking


@dataclass
class _Want:
    peer: KvPeer
    asked: bool = False
    handle: KvHandle | None = field(default=None)  # the lease, once answered
    answered: bool = False
    following: str | None = None  # the request whose pull of this run it waits for


class PeerSource:
    name = NAME

    def __init__(self, block_size: int, fingerprint: str):
        self.block_size, self.fingerprint = block_size, fingerprint
        self.wants: dict[str, _Want] = {}
        self._in_flight: dict[int, str] = {}  # block hash -> the request asking for / pulling it here
        self._leading: dict[str, list[int]] = {}  # leader request id -> the hashes it put in `_in_flight`
        self._followers: dict[str, list[str]] = {}  # leader request id -> requests waiting on its pull
        self.stats = PeerCounters()
        self._jobs: list[Any] = []

    def add(self, seq: Sequence, request: EngineRequest, hint: Any) -> None:
        if request.kv_peer is not None and request.kv_handle is None and request.kv_peer.blocks > 0:
            self.wants[seq.request_id] = _Want(request.kv_peer)

    def match(self, seq: Sequence, local_blocks: int) -> Match | None:
        rid = seq.request_id
        want = self.wants.get(rid)
        if want is None:
            return NO_MATCH
        loadable = min(want.peer.blocks, (seq.num_tokens - 1) // self.block_size)  # never the last token's block
        if loadable <= local_blocks:
            self._drop(rid)  # G1 holds as much as the peer: nothing to pull
            return NO_MATCH
        if not want.asked:
            if want.following is not None:
                return None
            hashes = seq.hasher.hashes[:loadable]
            leader = self._in_flight.get(hashes[local_blocks])
            if leader is not None and leader != rid:
                want.following = leader
                self._followers.setdefault(leader, []).append(rid)
                self.stats.followed += 1
                return None
            want.asked = True
            self.stats.asked += 1
            led = self._leading[rid] = [h for h in hashes[local_blocks:] if h not in self._in_flight]
            self._in_flight.update(dict.fromkeys(led, rid))
            self._jobs.append(PeerAsk(rid, want.peer, self.fingerprint, hashes))
            return None
        if not want.answered:
            return None
        n = min(len(want.handle.block_ids), loadable) if want.handle is not None else 0
        if n <= local_blocks:
            self.stats.fallbacks += want.handle is None or n < loadable
            self._drop(rid)
            return NO_MATCH
        return Match((n - local_blocks) * self.block_size)

    def answered(self, request_id: str, answer: Any) -> None:
        want = self.wants.get(request_id)
        if isinstance(answer, PeerWake):
            if want is not None:
                want.following = None  # match again: the leader's pull is in G1 now, or it failed
            return
        if want is None:  # finished meanwhile: nobody will pull this lease
            if answer is not None:
                self._give_back(request_id, answer)
            return
        want.answered, want.handle = True, answer

    def allocated(self, seq: Sequence, fresh: list[int] | None) -> None:
        want = self.wants.pop(seq.request_id)
        if want.handle is None:
            self._lead_ended(seq.request_id)
            return
        if fresh is None:  # blocks are short: the lease goes back, the prompt is computed
            self._lead_ended(seq.request_id)
            self._give_back(seq.request_id, want.handle)
            return
        handle = msgspec.structs.replace(want.handle, block_ids=want.handle.block_ids[:fresh[-1] + 1])
        self._jobs.append(PullJob(seq.request_id, handle, [seq.blocks[i].block_id for i in fresh], fresh[0], source=NAME))

    def arrived(self, seq: Sequence, fresh: list[int], kept: int) -> None:
        pulled = sum(1 for i in fresh if i < kept)
        self.stats.pulled_blocks += pulled
        self.stats.pulled_requests += pulled > 0
        self.stats.failures += pulled < len(fresh)
        self._lead_ended(seq.request_id)  # after the scheduler published what arrived: followers hit it

    def preempted(self, seq: Sequence, computed_blocks: int) -> None:
        pass

    def finished(self, request_id: str) -> None:
        self._drop(request_id)  # a leader's followers wake too

    def saved(self, block_ids: list[int]) -> None:
        pass

    def _drop(self, request_id: str) -> None:
        want = self.wants.pop(request_id, None)
        self._lead_ended(request_id)
        if want is not None and want.handle is not None:
            self._give_back(request_id, want.handle)

    def _lead_ended(self, request_id: str) -> None:
        """`request_id` no longer asks for or pulls its run: forget it as a leader, wake its followers."""
        for h in self._leading.pop(request_id, ()):
            del self._in_flight[h]
        for f in self._followers.pop(request_id, ()):
            if f in self.wants:
                self._jobs.append(PeerWake(f))

    def _give_back(self, request_id: str, handle: KvHandle) -> None:
        """Pull nothing: the job only frees the peer's lease."""
        self._jobs.append(PullJob(request_id, handle, [], len(handle.block_ids), report=False, source=NAME))

    def take_jobs(self) -> list[Any]:
        jobs, self._jobs = self._jobs, []
        return jobs

    def observe_step(self, prefill_tokens: int, seconds: float) -> None:
        pass

    def counters(self) -> dict[str, int]:
        s = self.stats
        return {"peer_asked": s.asked, "peer_pulled_requests": s.pulled_requests,
                "peer_pulled_blocks": s.pulled_blocks, "peer_failures": s.failures, "peer_fallbacks": s.fallbacks,
                "peer_followed": s.followed}

    def close(self) -> None:
        pass
